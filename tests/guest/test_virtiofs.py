"""A real Linux guest mounts an export through vfsd, with 1 and with 4 workers.

One daemon and one guest per worker count; every test runs shell commands in the guest and
checks the result on the host side too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.daemon_proc import Daemon
from tests.rig.qemu import Guest, boot_guest

pytestmark = pytest.mark.guest

MNT = "/mnt/vfs"


class Share:
    def __init__(self, daemon: Daemon, guest: Guest, export: Path) -> None:
        self.daemon = daemon
        self.guest = guest
        self.export = export

    def check(self, cmd: str, timeout: float = 120) -> str:
        try:
            return self.guest.check(cmd, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- vfsd log tail ---\n"
                                 + "\n".join(self.daemon.log().splitlines()[-40:])) from None


@pytest.fixture(scope="module", params=[1, 4], ids=lambda n: f"workers{n}")
def share(request, tmp_path_factory):
    workers = request.param
    work = tmp_path_factory.mktemp(f"vfs-w{workers}")
    export = work / "export"
    export.mkdir()
    (export / "hello.txt").write_text("hello from the host\n")
    daemon = Daemon(work, export, workers=workers)
    guest = None
    try:
        # More request queues than Linux uses: the device must still set them all up.
        guest = boot_guest(work, vhost_user_socket=daemon.socket_path, tag="vfs",
                           num_request_queues=1 if workers == 1 else 2)
        guest.mount_share(MNT)
        s = Share(daemon, guest, export)
        yield s
        guest.run(f"umount {MNT}", timeout=30)
        guest.close()
        guest = None
        assert daemon.wait(20) == 0, "vfsd must exit 0 when QEMU disconnects"
        served = daemon.served_per_worker()
        print(f"requests served per worker ({workers} workers): {served}")
        assert len(served) == workers
        if workers > 1:
            assert sum(1 for n in served if n > 0) > 1, f"only one worker served: {served}"
    finally:
        if guest is not None:
            guest.close()
        daemon.stop()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_host_file_visible_and_readable(share):
    assert share.check(f"cat {MNT}/hello.txt") == "hello from the host\n"
    (share.export / "later.txt").write_text("made on the host after mount\n")
    assert share.check(f"cat {MNT}/later.txt") == "made on the host after mount\n"


def test_create_write_append_truncate(share):
    share.check(f"echo first > {MNT}/f1 && echo second >> {MNT}/f1")
    assert (share.export / "f1").read_text() == "first\nsecond\n"
    share.check(f"truncate -s 3 {MNT}/f1")
    assert (share.export / "f1").read_bytes() == b"fir"
    share.check(f"truncate -s 10 {MNT}/f1")
    assert (share.export / "f1").read_bytes() == b"fir" + b"\0" * 7
    share.check(f": > {MNT}/f1 && printf abc > {MNT}/f1")  # O_TRUNC open
    assert (share.export / "f1").read_bytes() == b"abc"
    assert share.check(f"cat {MNT}/f1") == "abc"
    assert share.check(f"stat -c %s {MNT}/f1").strip() == "3"


def test_append_from_two_openers(share):
    share.check(f"for i in 1 2 3 4 5; do echo line$i >> {MNT}/app; done")
    assert (share.export / "app").read_text() == "".join(f"line{i}\n" for i in range(1, 6))


def test_mkdir_p_deep_tree(share):
    deep = "/".join(f"d{i}" for i in range(40))
    share.check(f"mkdir -p {MNT}/tree/{deep} && echo leaf > {MNT}/tree/{deep}/leaf")
    assert (share.export / "tree" / deep / "leaf").read_text() == "leaf\n"
    assert share.check(f"find {MNT}/tree -type d | wc -l").strip() == "41"


def test_ls_la_2000_entries(share):
    big = share.export / "big"
    big.mkdir()
    for i in range(1000):
        (big / f"host-{i:04d}").write_text(str(i))
    share.check(f"cd {MNT}/big && i=0; while [ $i -lt 1000 ]; do : > guest-$i; i=$((i+1)); done")
    out = share.check(f"ls -la {MNT}/big")
    names = [line.split()[-1] for line in out.splitlines()[1:]]
    assert len([n for n in names if n not in (".", "..")]) == 2000
    assert len(os.listdir(big)) == 2000
    assert share.check(f"ls {MNT}/big | sort | uniq | wc -l").strip() == "2000"


def test_rename_across_directories_and_over_existing(share):
    share.check(f"mkdir -p {MNT}/ra {MNT}/rb && echo moved > {MNT}/ra/x && "
                f"mv {MNT}/ra/x {MNT}/rb/y")
    assert not (share.export / "ra" / "x").exists()
    assert (share.export / "rb" / "y").read_text() == "moved\n"
    share.check(f"echo new > {MNT}/rb/z && mv -f {MNT}/rb/z {MNT}/rb/y")
    assert (share.export / "rb" / "y").read_text() == "new\n"
    assert not (share.export / "rb" / "z").exists()
    assert share.check(f"cat {MNT}/rb/y") == "new\n"


def test_hard_links_and_symlinks(share):
    share.check(f"echo data > {MNT}/orig && ln {MNT}/orig {MNT}/hard && ln -s orig {MNT}/soft")
    assert os.stat(share.export / "orig").st_ino == os.stat(share.export / "hard").st_ino
    assert os.stat(share.export / "orig").st_nlink == 2
    assert os.readlink(share.export / "soft") == "orig"
    assert share.check(f"stat -c %h {MNT}/orig").strip() == "2"
    assert share.check(f"readlink {MNT}/soft").strip() == "orig"
    assert share.check(f"cat {MNT}/soft") == "data\n"
    # An inode seen through two names is one inode in the guest too.
    ino1 = share.check(f"stat -c %i {MNT}/orig").strip()
    assert share.check(f"stat -c %i {MNT}/hard").strip() == ino1
    share.check(f"rm {MNT}/orig && cat {MNT}/hard")
    assert share.check(f"stat -c %h {MNT}/hard").strip() == "1"


def test_rm_rf(share):
    share.check(f"mkdir -p {MNT}/gone/a/b/c && touch {MNT}/gone/a/f {MNT}/gone/a/b/g "
                f"&& ln -s /etc {MNT}/gone/lnk && rm -rf {MNT}/gone")
    assert not (share.export / "gone").exists()


def test_200mib_file_checksums_both_sides(share):
    out = share.check(f"dd if=/dev/urandom of={MNT}/big.bin bs=1M count=200 2>&1 && sync && "
                      f"sha256sum {MNT}/big.bin", timeout=600)
    guest_sum = out.split()[-2]
    assert sha256(share.export / "big.bin") == guest_sum
    assert (share.export / "big.bin").stat().st_size == 200 << 20
    # Read back through vfsd, not from the guest page cache.
    share.check("echo 3 > /proc/sys/vm/drop_caches")
    assert share.check(f"sha256sum {MNT}/big.bin", timeout=600).split()[0] == guest_sum
    share.check(f"rm {MNT}/big.bin")


def test_eight_concurrent_writers(share):
    share.check(f"mkdir -p {MNT}/par && for i in 1 2 3 4 5 6 7 8; do "
                "(dd if=/dev/zero bs=64k count=64 2>/dev/null | tr '\\0' \"$i\" "
                f"> {MNT}/par/w$i) & done; wait", timeout=300)
    for i in range(1, 9):
        data = (share.export / "par" / f"w{i}").read_bytes()
        assert data == str(i).encode() * (64 * 65536)


def test_df(share):
    out = share.check(f"df -k {MNT}")
    fields = out.splitlines()[-1].split()
    st = os.statvfs(share.export)
    host_total_k = st.f_blocks * st.f_frsize // 1024
    assert abs(int(fields[1]) - host_total_k) <= host_total_k // 100 + 4


def test_remount(share):
    share.check(f"echo before > {MNT}/remount.txt && umount {MNT}")
    share.check(f"mount -t virtiofs vfs {MNT}")
    assert share.check(f"cat {MNT}/remount.txt") == "before\n"


def test_driver_reload_and_remount(share):
    share.check(f"umount {MNT} && rmmod virtiofs && modprobe virtiofs 2>/dev/null || "
                "insmod $(find /lib/modules -name 'virtiofs.ko*' | head -1)")
    share.check(f"mount -t virtiofs vfs {MNT}", timeout=60)
    share.check(f"echo after-reload > {MNT}/reload.txt")
    assert (share.export / "reload.txt").read_text() == "after-reload\n"


def test_created_files_get_the_callers_uid_gid(share):
    share.check(f"mkdir -p {MNT}/owned && chmod 1777 {MNT}/owned")
    share.check(f"runas 1234 5678 sh -c 'echo mine > {MNT}/owned/f && mkdir {MNT}/owned/d "
                f"&& ln -s f {MNT}/owned/l && mkfifo {MNT}/owned/p'")
    for name in ("f", "d", "l", "p"):
        st = os.lstat(share.export / "owned" / name)
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
    # Permission checks happen as the caller: a user cannot write root's 0644 file.
    share.check(f"echo root > {MNT}/owned/rootfile && chmod 644 {MNT}/owned/rootfile")
    rc, out = share.guest.run(f"runas 1234 5678 sh -c 'echo x >> {MNT}/owned/rootfile'")
    assert rc != 0 and "Permission denied" in out
    assert (share.export / "owned" / "rootfile").read_text() == "root\n"
