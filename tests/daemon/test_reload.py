"""SIGHUP: live settings change without disturbing the session; the rest is reported."""

import os
import signal
import time

from tests.daemon.conftest import Session, connect
from tests.daemon_proc import Daemon
from tests.unit.fusereq import entry, open_fh
from vfsd import status
from vfsd.fuse import abi


def wait_log(daemon, text, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in daemon.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log:\n{daemon.log()[-3000:]}")


def test_sighup_reload(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_text("content")
    cfg = tmp_path / "vfsd.yaml"
    cfg.write_text("workers: 1\nlog_level: info\ncache: auto\n")
    with Daemon(tmp_path, export, workers=1, extra=["--config", str(cfg)]) as daemon:
        # --workers on the command line would override the file: start from the file only.
        client = connect(daemon, num_queues=2)
        fuse = Session(daemon, client).fuse
        assert fuse.init().error == 0
        nodeid, _ = entry(fuse.lookup(1, b"f"))
        fh, _ = open_fh(fuse.open(nodeid))
        status_path = daemon.socket_path + ".status"

        # A broken file is refused; the daemon keeps its configuration.
        cfg.write_text("workers: 2\nlog_level: loud\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_log(daemon, "reload failed")
        assert len(status.query(status_path)["workers"]) == 1

        cfg.write_text("workers: 3\nlog_level: warning\ncache: never\nreadonly: true\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_log(daemon, "configuration reloaded")
        line = [ln for ln in daemon.log().splitlines() if "configuration reloaded" in ln][-1]
        assert "log_level=warning" in line and "cache=never" in line
        assert "needs_restart=readonly" in line
        snapshot = status.query(status_path)
        assert len(snapshot["workers"]) == 3 and all(w["pid"] for w in snapshot["workers"])
        # The session and the open file survived; new workers take requests too.
        assert fuse.read(nodeid, fh, 0, 100).body == b"content"
        for _ in range(30):
            assert fuse.getattr(nodeid).error == 0
        served = [w["served"] for w in status.query(status_path)["workers"]]
        assert sum(1 for n in served if n) >= 2, served
        # cache=never took effect for new entries and opens: 0 s timeouts, direct I/O.
        reply = fuse.lookup(1, b"f")
        assert abi.ENTRY_OUT.unpack_from(reply.body)[2:5:2] == (0, 0)  # entry_valid, _nsec
        _fh2, open_flags = open_fh(fuse.open(nodeid))
        assert open_flags & abi.FOPEN_DIRECT_IO
        # log_level=warning took effect: info lines stop appearing.
        before = daemon.log().count(" I [")
        os.kill(daemon.proc.pid, signal.SIGHUP)  # same file again: nothing changes
        time.sleep(0.5)
        assert daemon.log().count(" I [") == before
        client.close()
        assert daemon.wait(10) == 0


def test_sighup_without_a_config_file_says_so(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    with Daemon(tmp_path, export, workers=1) as daemon:
        wait_log(daemon, "vfsd ready")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_log(daemon, "no configuration file to reload")
        assert "configuration reloaded" not in daemon.log()
        assert daemon.proc.poll() is None
