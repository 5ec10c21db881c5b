"""What a real vfsd process says and does at start-up about host-dependent settings and
device nodes (allow_devices)."""

import errno
import os
import stat
import subprocess
import sys

import pytest

from tests.daemon.conftest import Session, connect
from tests.daemon_proc import REPO, Daemon

RISK = "not on a nodev mount"


@pytest.fixture
def tmpfs_export(tmp_path):
    """An export on its own tmpfs mounted with `dev` (device nodes work there)."""
    export = tmp_path / "export"
    export.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,dev", "tmpfs", export],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield export
    subprocess.run(["umount", "-l", export], check=True)


def mknod_null(daemon: Daemon) -> int:
    client = connect(daemon, num_queues=2)
    try:
        s = Session(daemon, client)
        assert s.fuse.init().error == 0
        return s.fuse.mknod(1, b"null", stat.S_IFCHR | 0o600, (1 << 8) | 3).error
    finally:
        client.close()


def test_device_nodes_by_default_with_a_warning_unless_nodev(tmp_path, tmpfs_export):
    with Daemon(tmp_path, tmpfs_export) as daemon:
        assert mknod_null(daemon) == 0
        assert os.lstat(tmpfs_export / "null").st_rdev == os.makedev(1, 3)
        assert daemon.wait(10) == 0
        assert RISK in daemon.log()
    os.unlink(tmpfs_export / "null")
    subprocess.run(["mount", "-o", "remount,nodev", tmpfs_export], check=True)
    work = tmp_path / "nodev"  # a fresh log
    work.mkdir()
    with Daemon(work, tmpfs_export) as daemon:
        assert mknod_null(daemon) == 0  # made, but opens no host device on a nodev mount
        assert daemon.wait(10) == 0
        assert RISK not in daemon.log()


@pytest.mark.parametrize("flag", ["--allow-devices=whiteouts", "--no-allow-devices"])
def test_hardened_modes_refuse_device_nodes_without_a_warning(tmp_path, tmpfs_export, flag):
    with Daemon(tmp_path, tmpfs_export, extra=[flag]) as daemon:
        assert mknod_null(daemon) == errno.EPERM
        assert daemon.wait(10) == 0
        assert RISK not in daemon.log()
    assert not os.path.lexists(tmpfs_export / "null")


def test_unusable_cpus_stop_start_up_with_ranges(tmp_path):
    top = max(os.sched_getaffinity(0))
    proc = subprocess.run(
        [sys.executable, "-m", "vfsd", "--shared-dir", str(tmp_path), "--socket-path",
         str(tmp_path / "s.sock"), "--supervisor-cpus", f"0-{top + 98}"],
        capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 1
    assert f"vfsd: supervisor_cpus: CPU(s) {top + 1}-{top + 98} not available" in proc.stderr
    assert not os.path.exists(tmp_path / "s.sock")
