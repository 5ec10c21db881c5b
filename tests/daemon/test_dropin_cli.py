"""virtiofsd's command line works unchanged (libvirt starts vfsd exactly like virtiofsd)."""

import grp
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

from tests.daemon.conftest import Session, connect
from tests.daemon_proc import REPO, Daemon
from vfsd import cli


def test_virtiofsd_flags_are_accepted_and_mapped(tmp_path):
    s = cli.settings_from_args([
        "--socket-path=/tmp/x.sock", "-o", "source=/srv,cache=always,xattr", "--thread-pool-size",
        "3", "--log-level", "warn", "--announce-submounts", "--inode-file-handles=prefer",
        "--sandbox", "none", "--seccomp", "none", "-f", "--rlimit-nofile", "4096",
        "--socket-group", "root", "--syslog"])
    assert (s.shared_dir, s.cache, s.xattr, s.workers, s.log_level) == (
        "/srv", "always", True, 3, "warning")
    assert s.announce_submounts and s.inode_file_handles == "prefer"
    assert (s.rlimit_nofile, s.socket_group, s.syslog) == (4096, "root", True)
    assert cli.settings_from_args(["-d", "--shared-dir", "/x"]).log_level == "debug"
    assert cli.settings_from_args(["--log-level", "trace", "--shared-dir", "/x"]).log_level \
        == "debug"


def test_unimplemented_flags_warn_never_silently(tmp_path):
    warnings = cli.unimplemented_flags(["--sandbox", "namespace", "--seccomp", "kill",
                                        "--modcaps=-sys_admin", "--uid-map", ":0:1000:1:"])
    assert len(warnings) == 4
    assert any("--sandbox namespace" in w for w in warnings)
    assert cli.unimplemented_flags(["--sandbox", "none", "--seccomp", "none"]) == []
    proc = subprocess.run([sys.executable, "-m", "vfsd", "--sandbox", "chroot"],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode != 0  # no export given; the warning still came first
    assert "--sandbox chroot: not implemented" in proc.stderr


def test_socket_group_and_rlimit_take_effect(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    group = grp.getgrgid(os.getgid()).gr_name
    with Daemon(tmp_path, export, workers=1,
                extra=["--socket-group", group, "--rlimit-nofile", "2048"]) as daemon:
        st = os.stat(daemon.socket_path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
        with open(f"/proc/{daemon.proc.pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max open files"))
        assert line.split()[3:5] == ["2048", "2048"]
        client = connect(daemon, num_queues=2)
        assert Session(daemon, client).fuse.init().error == 0
        client.close()
        assert daemon.wait(10) == 0
    assert resource.getrlimit(resource.RLIMIT_NOFILE)  # the test process is unaffected


def test_supervisor_and_worker_cpus_take_effect(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    sup, wrk = str(cpus[0]), str(cpus[-1])
    export = tmp_path / "export"
    export.mkdir()
    with Daemon(tmp_path, export, workers=2,
                extra=["--supervisor-cpus", sup, "--worker-cpus", wrk]) as daemon:
        client = connect(daemon, num_queues=2)
        assert Session(daemon, client).fuse.init().error == 0
        children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children")
        workers = [int(p) for p in children.read_text().split()]
        assert len(workers) == 2
        assert os.sched_getaffinity(daemon.proc.pid) == {int(sup)}
        assert all(os.sched_getaffinity(pid) == {int(wrk)} for pid in workers)
        assert f"supervisor_cpus={sup}" in daemon.log()
        client.close()
        assert daemon.wait(10) == 0
    # A CPU the daemon may not use is a one-line start-up error naming the setting.
    proc = subprocess.run([sys.executable, "-m", "vfsd", "--socket-path",
                           str(tmp_path / "other.sock"), "--shared-dir", str(export),
                           "--worker-cpus", str(cpus[-1] + 1)],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode != 0
    assert f"vfsd: worker_cpus: CPU(s) {cpus[-1] + 1} not available" in proc.stderr
