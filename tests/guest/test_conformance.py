"""POSIX conformance of vfsd, judged from inside a real Linux guest.

The checks are static C programs (tests/guest/progs/conform.c, fsverify.c) that print one
line per check, "PASS name" or "FAIL name: expected X got Y". The same binaries run first on
the host's own file system (ext4 here): the expectations are what the host gives.

Guests (one daemon + one boot each):
- main: 4 workers, xattr on, a tmpfs mounted inside the export; the whole suite, 100 000
  directory entries listed while the directory changes, a directory deleted on the host
  while the guest holds it open, the random I/O verifier, lock contention (in the suite);
- cache never / cache always: the random I/O verifier again;
- options: posix_acl, killpriv_v2, announce_submounts, security_label, cache metadata (the
  suite again, ACLs, submount st_dev);
- readonly + xattrmap + translate_uid/gid: what the guest sees and may not do;
- device nodes: allow_devices all (the default), whiteouts and none, with overlayfs in the
  guest on an upper directory in the share.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import Daemon
from tests.rig.build import compile_progs
from tests.rig.qemu import Guest, boot_guest

pytestmark = pytest.mark.guest

MNT = "/mnt/vfs"
VERIFY_OPS = 20000
VERIFY_SEED = 20240611
READDIR_ENTRIES = 100_000


class Share:
    def __init__(self, daemon: Daemon, guest: Guest, export: Path) -> None:
        self.daemon = daemon
        self.guest = guest
        self.export = export

    def run(self, cmd: str, timeout: float = 300) -> tuple[int, str]:
        rc, out = self.guest.run(cmd, timeout)
        return rc, out

    def check(self, cmd: str, timeout: float = 120) -> str:
        try:
            return self.guest.check(cmd, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- vfsd log tail ---\n"
                                 + "\n".join(self.daemon.log().splitlines()[-40:])) from None

    def checks(self, cmd: str, timeout: float = 300) -> dict[str, str]:
        """Run a PASS/FAIL-printing program; assert no FAIL; returns name -> line."""
        rc, out = self.guest.run(cmd, timeout)
        return assert_all_pass(out, rc, cmd, self.daemon)


def parse_checks(out: str) -> tuple[dict[str, str], list[str]]:
    results, failed = {}, []
    for line in out.splitlines():
        m = re.match(r"(PASS|FAIL) (\S+?):?( |$)", line)
        if m:
            results[m.group(2)] = line
            if m.group(1) == "FAIL":
                failed.append(line)
    return results, failed


def assert_all_pass(out: str, rc: int, what: str, daemon: Daemon | None = None) -> dict[str, str]:
    results, failed = parse_checks(out)
    log_tail = ""
    if daemon is not None and (failed or rc):
        log_tail = "\n--- vfsd log tail ---\n" + "\n".join(daemon.log().splitlines()[-30:])
    assert not failed and rc == 0 and results, (
        f"{what}: rc={rc}, {len(failed)} of {len(results)} checks failed:\n"
        + "\n".join(failed) + f"\n--- output ---\n{out[-3000:]}{log_tail}")
    print(f"{what}: {len(results)} checks passed")
    return results


def tmpfs(path: Path) -> bool:
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def start(work: Path, export: Path, workers: int, extra: list[str]) -> Iterator[Share]:
    """Daemon + guest with the share mounted at MNT; torn down with the checks of a clean
    exit (the daemon must exit 0 when QEMU goes)."""
    daemon = Daemon(work, export, workers=workers, extra=extra)
    guest = None
    try:
        guest = boot_guest(work, vhost_user_socket=daemon.socket_path, tag="vfs",
                           num_request_queues=2, mem="768M")
        guest.mount_share(MNT)
        yield Share(daemon, guest, export)
        guest.run(f"umount {MNT}", timeout=30)
        guest.close()
        guest = None
        assert daemon.wait(20) == 0, "vfsd must exit 0 when QEMU disconnects"
    finally:
        if guest is not None:
            guest.close()
        daemon.stop()


# ------------------------------------------------------------------------------ host self-check
@pytest.fixture(scope="module")
def progs() -> dict[str, Path]:
    return compile_progs()


def test_expectations_hold_on_the_host_file_system(progs):
    """The suite must pass on the host's own file system: its expectations are ext4's."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # Not under pytest's tmp_path: its 0700 parents would lock the unprivileged user out.
    top = Path(tempfile.mkdtemp(prefix="vfsd-conform-", dir="/tmp"))
    os.chmod(top, 0o755)
    work = top / "host"
    work.mkdir()
    other = top / "other"
    mounted = tmpfs(other)
    try:
        args = [str(progs["conform"]), "suite", str(work), "-x"]
        if mounted:
            args += ["-m", str(other)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        results = assert_all_pass(r.stdout + r.stderr, r.returncode, "conform on the host")
        assert mounted is ("exdev.rename_across_mounts" in results)
        r = subprocess.run([str(progs["fsverify"]), str(work), str(VERIFY_OPS), str(VERIFY_SEED)],
                           capture_output=True, text=True, timeout=120)
        assert_all_pass(r.stdout, r.returncode, "fsverify on the host")
        big = work / "big"
        big.mkdir()
        for i in range(20000):
            (big / f"e{i:06d}").touch()
        r = subprocess.run([str(progs["conform"]), "readdir", str(big), "20000"],
                           capture_output=True, text=True, timeout=60)
        assert_all_pass(r.stdout, r.returncode, "readdir on the host")
    finally:
        if mounted:
            umount(other)
        shutil.rmtree(top, ignore_errors=True)


# ------------------------------------------------------------------------------ main guest
@pytest.fixture(scope="module")
def share(tmp_path_factory) -> Iterator[Share]:
    work = tmp_path_factory.mktemp("conform")
    export = work / "export"
    export.mkdir()
    os.chmod(export, 0o755)
    big = export / "big"
    big.mkdir()
    for i in range(READDIR_ENTRIES):
        (big / f"e{i:06d}").touch()
    mnt = export / "mnt"
    mounted = tmpfs(mnt)
    try:
        yield from start(work, export, 4, ["--xattr"])
    finally:
        if mounted:
            umount(mnt)


def test_conformance_suite(share):
    other = ["-m", f"{MNT}/mnt"] if os.path.ismount(share.export / "mnt") else []
    results = share.checks(f"conform suite {MNT} -x {' '.join(other)}")
    assert len(results) > 180
    assert not other or "exdev.link_across_mounts" in results
    for name in ("lock.fcntl_setlkw_blocked_until_unlock", "lock.fcntl_close_of_any_fd_releases",
                 "lock.flock_blocked_until_unlock", "lock.fcntl_getlk_reports_holder_pid"):
        assert name in results, name


def test_readdir_100000_entries_exactly_once_while_changing(share):
    share.checks(f"conform readdir {MNT}/big {READDIR_ENTRIES}", timeout=600)
    names = os.listdir(share.export / "big")
    assert len(names) == READDIR_ENTRIES  # the extra names were cleaned up


def test_directory_deleted_on_the_host_while_open(share):
    d = share.export / "doomed"
    d.mkdir()
    (d / "before").write_text("x")
    share.check(f"rm -f /tmp/go /tmp/hold.out; conform holddir {MNT}/doomed /tmp/go "
                "> /tmp/hold.out 2>&1 & "
                "i=0; while ! grep -q READY /tmp/hold.out && [ $i -lt 200 ]; do "
                "sleep 0.05; i=$((i+1)); done; cat /tmp/hold.out")
    (d / "before").unlink()
    d.rmdir()
    out = share.check("touch /tmp/go; i=0; while ! grep -q DONE /tmp/hold.out && [ $i -lt 300 ]; "
                      "do sleep 0.05; i=$((i+1)); done; cat /tmp/hold.out")
    results = assert_all_pass(out, 0, "deleted directory", share.daemon)
    assert len(results) == 8
    assert share.check(f"ls {MNT} | grep -c doomed || true").strip() == "0"


def test_export_containing_a_mount_point(share):
    if not os.path.ismount(share.export / "mnt"):
        pytest.skip("no tmpfs inside the export")
    (share.export / "mnt" / "host.txt").write_text("on tmpfs\n")
    assert share.check(f"cat {MNT}/mnt/host.txt") == "on tmpfs\n"
    share.check(f"echo guest > {MNT}/mnt/guest.txt && mkdir {MNT}/mnt/d && mv {MNT}/mnt/guest.txt "
                f"{MNT}/mnt/d/")
    assert (share.export / "mnt" / "d" / "guest.txt").read_text() == "guest\n"
    # Without announce_submounts the guest sees one file system.
    dev = share.check(f"stat -c %d {MNT} {MNT}/mnt").split()
    assert dev[0] == dev[1]


def test_guest_locks_are_host_locks(share):
    """fcntl and flock locks taken in the guest are held on the host file, and the other
    way round (they would stay guest-local without FUSE_POSIX_LOCKS / FLOCK_LOCKS)."""
    path = share.export / "shared.lock"
    path.write_bytes(b"0" * 100)
    share.check(f"rm -f /tmp/lgo; conform lockhold {MNT}/shared.lock /tmp/lgo > /tmp/lh.out 2>&1 & "
                "i=0; while ! grep -q READY /tmp/lh.out && [ $i -lt 200 ]; do sleep 0.05; "
                "i=$((i+1)); done; cat /tmp/lh.out")
    fd, fd2 = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 5)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 50)  # outside the guest's range
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 50)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        share.check("touch /tmp/lgo; i=0; while ! grep -q DONE /tmp/lh.out && [ $i -lt 200 ]; "
                    "do sleep 0.05; i=$((i+1)); done")
        deadline = time.monotonic() + 10
        while True:  # the guest's close (FLUSH, then an asynchronous RELEASE) frees them
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
                fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the guest's locks outlived its process"
                time.sleep(0.05)
        # Host locks held: the guest sees them.
        assert share.check(f"conform trylock {MNT}/shared.lock").split() == [
            "fcntl", "LOCKED", "flock", "LOCKED"]
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        fcntl.flock(fd2, fcntl.LOCK_UN)
        assert share.check(f"conform trylock {MNT}/shared.lock").split() == [
            "fcntl", "FREE", "flock", "FREE"]
    finally:
        os.close(fd)
        os.close(fd2)


def test_random_io_verifier(share):
    out = share.check(f"fsverify {MNT} {VERIFY_OPS} {VERIFY_SEED}", timeout=900)
    assert f"PASS fsverify ops={VERIFY_OPS}" in out, out


# ------------------------------------------------------------------------------ cache modes
@pytest.fixture(scope="module", params=[("never", 1), ("always", 4)],
                ids=lambda p: f"cache-{p[0]}-workers{p[1]}")
def cache_share(request, tmp_path_factory) -> Iterator[Share]:
    cache, workers = request.param
    work = tmp_path_factory.mktemp(f"verify-{cache}")
    export = work / "export"
    export.mkdir()
    os.chmod(export, 0o755)
    yield from start(work, export, workers, ["--cache", cache, "--xattr"])


def test_random_io_verifier_cache_modes(cache_share):
    out = cache_share.check(f"fsverify {MNT} {VERIFY_OPS} {VERIFY_SEED + 1}", timeout=900)
    assert f"PASS fsverify ops={VERIFY_OPS}" in out, out


def test_suite_cache_modes(cache_share):
    """With one worker, the waiting SETLKW and the unlock that frees it meet in the same
    worker: the lock checks pass only if a waiting lock does not stall it."""
    cache_share.checks(f"conform suite {MNT} -x")


# ------------------------------------------------------------------------------ options
@pytest.fixture(scope="module")
def opt_share(tmp_path_factory) -> Iterator[Share]:
    work = tmp_path_factory.mktemp("options")
    export = work / "export"
    export.mkdir()
    os.chmod(export, 0o755)
    mnt = export / "mnt"
    mounted = tmpfs(mnt)
    try:
        yield from start(work, export, 4, ["--posix-acl", "--killpriv-v2", "--announce-submounts",
                                           "--security-label", "--cache", "metadata"])
    finally:
        if mounted:
            umount(mnt)


def test_suite_with_posix_acl_killpriv_v2_submounts(opt_share):
    """With killpriv_v2 the guest leaves suid/sgid clearing to vfsd (kill.* checks); with
    posix_acl the guest enforces permissions from ACLs."""
    other = ["-m", f"{MNT}/mnt"] if os.path.ismount(opt_share.export / "mnt") else []
    results = opt_share.checks(f"conform suite {MNT} -x {' '.join(other)}")
    assert "kill.write_by_owner_clears_suid_sgid" in results


def test_posix_acl_in_the_guest(opt_share):
    opt_share.check(f"mkdir -p {MNT}/acl && echo secret > {MNT}/acl/f && chmod 600 {MNT}/acl/f")
    rc, out = opt_share.run(f"runas 1234 1234 cat {MNT}/acl/f")
    assert rc != 0 and "Permission denied" in out
    opt_share.check(f"setfacl -m u:1234:r {MNT}/acl/f")
    assert opt_share.check(f"runas 1234 1234 cat {MNT}/acl/f") == "secret\n"
    assert "user:1234:r--" in subprocess.run(["getfacl", "-p", str(opt_share.export / "acl" / "f")],
                                             capture_output=True, text=True).stdout
    # A default ACL wins over the creator's umask.
    opt_share.check(f"mkdir {MNT}/acl/d && setfacl -d -m u::rwx,g::rwx,o::rwx {MNT}/acl/d")
    opt_share.check(f"umask 077 && : > {MNT}/acl/d/new && mkdir {MNT}/acl/d/sub "
                    f"&& umask 077 && : > {MNT}/acl/plain")
    assert opt_share.check(f"stat -c %a {MNT}/acl/d/new {MNT}/acl/d/sub {MNT}/acl/plain").split() \
        == ["666", "777", "600"]
    assert (os.stat(opt_share.export / "acl" / "d" / "new").st_mode & 0o777) == 0o666


def test_announce_submounts_gives_the_mount_its_own_device(opt_share):
    if not os.path.ismount(opt_share.export / "mnt"):
        pytest.skip("no tmpfs inside the export")
    (opt_share.export / "mnt" / "inner").write_text("inner\n")
    devs = opt_share.check(f"stat -c %d {MNT} {MNT}/mnt {MNT}/mnt/inner").split()
    assert devs[0] != devs[1] and devs[1] == devs[2]
    assert f"{MNT}/mnt " in opt_share.check("cat /proc/mounts")
    assert opt_share.check(f"cat {MNT}/mnt/inner") == "inner\n"
    opt_share.check(f"umount {MNT}/mnt")


@pytest.fixture(scope="module")
def ro_share(tmp_path_factory) -> Iterator[Share]:
    work = tmp_path_factory.mktemp("readonly")
    export = work / "export"
    export.mkdir()
    f = export / "owned"
    f.write_text("data\n")
    os.chown(f, 3005, 3007)
    os.setxattr(f, "user.virtiofs.user.k", b"mapped")
    os.setxattr(f, "user.hidden", b"host only")
    yield from start(work, export, 2, [
        "--readonly", "--xattr", "--xattrmap", ":prefix:all::user.virtiofs.::bad:all:::",
        "--translate-uid", "map:1000:3000:10", "--translate-gid", "map:1000:3000:10"])


def test_readonly_export(ro_share):
    assert ro_share.check(f"cat {MNT}/owned") == "data\n"
    for cmd in (f": > {MNT}/new", f"mkdir {MNT}/d", f"rm {MNT}/owned", f"echo x >> {MNT}/owned",
                f"touch {MNT}/owned", f"chmod 777 {MNT}/owned",
                f"setfattr -n user.a -v 1 {MNT}/owned"):
        rc, out = ro_share.run(cmd)
        assert rc != 0 and "Read-only file system" in out, (cmd, out)
    assert sorted(os.listdir(ro_share.export)) == ["owned"]


def test_translated_ids_and_mapped_xattrs_seen_by_the_guest(ro_share):
    assert ro_share.check(f"stat -c '%u %g' {MNT}/owned").strip() == "1005 1007"
    value = ro_share.check(f"getfattr --absolute-names --only-values -n user.k {MNT}/owned")
    assert value == "mapped"
    names = ro_share.check(f"getfattr --absolute-names -d -m - {MNT}/owned")
    assert "user.k" in names and "hidden" not in names and "virtiofs" not in names


# ------------------------------------------------------------------------------ device nodes
@pytest.fixture(scope="module", params=["all", "whiteouts", "none"])
def dev_share(request, tmp_path_factory) -> Iterator[tuple[str, Share]]:
    """allow_devices: all is the default (no flag); overlayfs needs xattrs on its upper."""
    mode = request.param
    work = tmp_path_factory.mktemp(f"devices-{mode}")
    export = work / "export"
    export.mkdir()
    flags = ["--xattr"] + ([] if mode == "all" else [f"--allow-devices={mode}"])
    for share in start(work, export, 2, flags):
        yield mode, share


def test_device_nodes_and_overlayfs_whiteouts(dev_share):
    mode, share = dev_share
    rc, out = share.run(f"mknod {MNT}/null c 1 3 && mknod {MNT}/sda b 8 0")
    if mode == "all":
        assert rc == 0, out
        assert os.lstat(share.export / "null").st_rdev == os.makedev(1, 3)
        assert stat.S_ISBLK(os.lstat(share.export / "sda").st_mode)
    else:
        assert rc != 0 and "Operation not permitted" in out, out
        assert not os.path.lexists(share.export / "null")
    # Containers in a VM: overlayfs with its upper directory on the share. Deleting a lower
    # file writes a whiteout, a 0:0 character device, into the upper directory.
    rc, out = share.run(f"mkdir -p /tmp/lower /tmp/merged {MNT}/upper {MNT}/work"
                        " && echo x > /tmp/lower/gone && echo y > /tmp/lower/kept && mount -t"
                        f" overlay -o lowerdir=/tmp/lower,upperdir={MNT}/upper,workdir={MNT}/work"
                        " ovl /tmp/merged")
    if mode == "none":  # overlayfs makes a whiteout in its work directory when it mounts
        assert rc != 0 and "permission denied" in out, out
        return
    assert rc == 0, out
    share.check("rm /tmp/merged/gone")
    assert share.check("ls /tmp/merged").split() == ["kept"]
    st = os.lstat(share.export / "upper" / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    share.check("umount /tmp/merged")
