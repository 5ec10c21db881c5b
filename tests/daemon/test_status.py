"""`vfsd status`: the control socket reports workers, load and in-flight requests."""

from tests.unit.fusereq import build
from vfsd import status
from vfsd.frontend.fuse_client import REQUEST_QUEUE
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode


def test_status_snapshot(session):
    fuse, daemon = session.fuse, session.daemon
    for _ in range(20):
        assert fuse.getattr(1).error == 0
    snap = status.query(daemon.socket_path + ".status")
    assert snap["export"] == str(daemon.export)
    assert snap["connected"] and snap["fuse_minor"] == 38
    assert snap["inflight_total"] == 0
    workers = snap["workers"]
    assert all(w["pid"] and w["restarts"] == 0 for w in workers)
    assert sum(w["served"] for w in workers) >= 20
    text = status.render(snap)
    assert "in flight: 0" in text and str(workers[0]["pid"]) in text


def test_status_lists_a_request_that_is_in_flight(session):
    """A request the supervisor dispatched but no worker finished shows up with its age."""
    client, daemon = session.client, session.daemon
    # SETLKW-free way to hold a request: stop every worker with SIGSTOP, then submit.
    import os
    import signal

    pids = [w["pid"] for w in status.query(daemon.socket_path + ".status")["workers"]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        client.submit(REQUEST_QUEUE, [build(Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0),
                                            unique=4242)], [16, 104])
        snap = {}
        for _ in range(100):
            snap = status.query(daemon.socket_path + ".status")
            if snap["inflight_total"]:
                break
        assert snap["inflight_total"] == 1
        row = snap["inflight"][0]
        assert (row["op"], row["nodeid"], row["unique"]) == ("GETATTR", 1, 4242)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert len(client.wait(REQUEST_QUEUE, timeout=5)) == 1


def test_status_command_line(session, capsys):
    from vfsd.cli import main

    assert main(["status", session.daemon.socket_path]) == 0
    out = capsys.readouterr().out
    assert "in flight: 0" in out and "worker" in out
    assert main(["status", session.daemon.socket_path, "--json"]) == 0
    assert '"inflight_total": 0' in capsys.readouterr().out
    assert main(["status", "/nonexistent.sock"]) == 1


def test_print_capabilities(capsys):
    import json

    from vfsd.cli import main

    assert main(["--print-capabilities"]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert caps["type"] == "fs"
