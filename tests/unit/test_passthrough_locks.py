"""GETLK / SETLK / SETLKW (POSIX and flock) through FuseServer + PassthroughFs, with two
workers in one process sharing the inode table and the lock-owner registry (as root)."""

import errno
import fcntl
import os
import select
import time

import pytest
from fusereq import FuseClient, buffers, build, chunks, entry, open_fh

from vfsd.fs.inode_table import ROOT_ID, InodeTable
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.fuse.options import FsOptions
from workers.passthrough import locks
from workers.passthrough.fs import PassthroughFs
from workers.server import FuseServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (file handles, creds)")

EOF = locks.OFFSET_MAX
A, B, C = 0xA0A0, 0xB0B0, 0xC0C0  # lock owners (guest processes)


class Workers:
    def __init__(self, tmp_path, n=2, **opts):
        self.root = tmp_path / "export"
        self.root.mkdir()
        self.table = InodeTable.create(1024)
        self.options = FsOptions(shared_dir=str(self.root), **opts)
        self.fs = [PassthroughFs(self.options, self.table, i) for i in range(n)]
        self.servers = [FuseServer(fs, self.options) for fs in self.fs]
        self.c = [FuseClient(s) for s in self.servers]
        assert self.c[0].init().error == 0
        for s in self.servers[1:]:
            s.start_session(self.servers[0].session)

    def close(self):
        for s in self.servers:
            s.close()
        for fs in self.fs:
            fs.close()
        self.table.close()

    def file(self, name=b"f", data=b"x" * 100):
        with open(self.root / name.decode(), "wb") as f:
            f.write(data)
        return entry(self.c[0].lookup(ROOT_ID, name))[0]

    def open(self, w, nodeid, flags=os.O_RDWR):
        return open_fh(self.c[w].open(nodeid, flags))[0]


@pytest.fixture
def ws(tmp_path):
    locks.REGISTRY.find(0, 0, 0)  # opens this process's registry lock fd (kept for good)
    before = set(os.listdir("/proc/self/fd"))
    w = Workers(tmp_path)
    yield w
    w.close()
    assert set(os.listdir("/proc/self/fd")) <= before, "file descriptors leaked"
    assert locks.REGISTRY.count == 0, "lock registry entries left behind"


def lk_body(fh, owner, start=0, end=EOF, typ=fcntl.F_WRLCK, pid=1000, flock=False):
    return abi.LK_IN.pack(fh, owner, start, end, typ, pid,
                          abi.FUSE_LK_FLOCK if flock else 0, 0)


def setlk(ws, w, nodeid, fh, owner, **kw):
    return ws.c[w].call(Opcode.SETLK, nodeid, lk_body(fh, owner, **kw)).error


def getlk(ws, w, nodeid, fh, owner, **kw):
    r = ws.c[w].call(Opcode.GETLK, nodeid, lk_body(fh, owner, **kw))
    assert r.error == 0, os.strerror(r.error)
    return locks.Lock(*abi.LK_OUT.unpack(r.body))


class Deferred:
    """A SETLKW sent straight to a server, answered later through collect()."""

    def __init__(self, server, nodeid, body, unique=4242):
        self.server = server
        self.unique = unique
        self.wr = buffers(16)
        rd = chunks(build(Opcode.SETLKW, nodeid, body, unique=unique), [40])
        self.result = server.handle(rd, self.wr, ("token", unique))

    def wait(self, timeout=5.0):
        """errno of the reply once collect() hands it out (None on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            select.select([self.server.deferred_fd], [], [], 0.05)
            for token, written in self.server.collect():
                assert token == ("token", self.unique) and written == 16
                length, error, unique = abi.OUT_HEADER.unpack_from(self.wr[0])
                assert (length, unique) == (16, self.unique)
                return -error
        return None


def test_posix_conflicts_between_owners_not_within_one(ws):
    n = ws.file()
    fh0 = ws.open(0, n)
    fh1 = ws.open(1, n)
    assert setlk(ws, 0, n, fh0, A, start=0, end=9) == 0
    assert setlk(ws, 1, n, fh1, B, start=5, end=20) == errno.EAGAIN
    assert setlk(ws, 1, n, fh1, B, start=10, end=20) == 0
    # Owner A through a file opened in the *other* worker: the same OFD (no self-conflict).
    fh1a = ws.open(1, n)
    assert setlk(ws, 1, n, fh1a, A, start=0, end=9, typ=fcntl.F_RDLCK) == 0  # downgrade
    assert setlk(ws, 1, n, fh1, B, start=0, end=3, typ=fcntl.F_RDLCK) == 0
    # Unlock, then B can take the range for writing.
    assert setlk(ws, 0, n, fh0, A, start=0, end=9, typ=fcntl.F_UNLCK) == 0
    assert setlk(ws, 1, n, fh1, B, start=0, end=9) == 0
    for w, fh in ((0, fh0), (1, fh1), (1, fh1a)):
        assert ws.c[w].release(n, fh).error == 0


def test_getlk_reports_range_type_and_holder_pid(ws):
    n = ws.file()
    fh0, fh1 = ws.open(0, n), ws.open(1, n)
    got = getlk(ws, 1, n, fh1, B)
    assert got.type == fcntl.F_UNLCK
    assert setlk(ws, 0, n, fh0, A, start=10, end=19, pid=777) == 0
    got = getlk(ws, 1, n, fh1, B, start=0, end=EOF, typ=fcntl.F_RDLCK)
    assert (got.start, got.end, got.type, got.pid) == (10, 19, fcntl.F_WRLCK, 777)
    assert getlk(ws, 0, n, fh0, A).type == fcntl.F_UNLCK  # own locks never conflict
    # Three owners: the holder is found by probing.
    assert setlk(ws, 1, n, fh1, C, start=50, end=59, typ=fcntl.F_RDLCK, pid=888) == 0
    got = getlk(ws, 1, n, fh1, B, start=50, end=50)
    assert (got.start, got.end, got.type, got.pid) == (50, 59, fcntl.F_RDLCK, 888)
    got = getlk(ws, 0, n, fh0, B, start=15, end=15)
    assert got.pid == 777
    ws.c[0].release(n, fh0)
    ws.c[1].release(n, fh1)


def test_locks_are_visible_to_host_processes(ws, tmp_path):
    n = ws.file()
    fh = ws.open(0, n)
    assert setlk(ws, 0, n, fh, A, start=0, end=0) == 0
    fd = os.open(ws.root / "f", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 5)  # another byte: free
        assert setlk(ws, 0, n, fh, B, start=5, end=5) == errno.EAGAIN
    finally:
        os.close(fd)
    ws.c[0].release(n, fh)


def test_flush_drops_all_locks_of_the_owner_across_workers(ws):
    n = ws.file()
    fh0, fh1, fhb = ws.open(0, n), ws.open(1, n), ws.open(1, n)
    assert setlk(ws, 0, n, fh0, A, start=0, end=9) == 0
    assert setlk(ws, 0, n, fh0, B, start=50, end=59) == 0
    # A closes another file of the same inode, opened in worker 1 (POSIX: all A's locks go).
    assert ws.c[1].call(Opcode.FLUSH, n, abi.FLUSH_IN.pack(fh1, 0, 0, A)).error == 0
    assert setlk(ws, 1, n, fhb, C, start=0, end=9) == 0
    assert setlk(ws, 1, n, fhb, C, start=50, end=50) == errno.EAGAIN  # B's stay
    # A locks again afterwards; the old fh's RELEASE must not drop the new lock.
    assert setlk(ws, 0, n, fh0, A, start=20, end=29) == 0
    assert ws.c[1].release(n, fh1).error == 0
    assert setlk(ws, 1, n, fhb, C, start=20, end=20) == errno.EAGAIN
    for w, fh in ((0, fh0), (1, fhb)):
        ws.c[w].release(n, fh)


def test_release_drops_locks_of_file_owners(ws):
    """Guest OFD locks use the guest file as owner: they end with its RELEASE."""
    n = ws.file()
    fh0, fh1 = ws.open(0, n), ws.open(1, n)
    assert setlk(ws, 0, n, fh0, fh0, start=0, end=9) == 0
    assert setlk(ws, 1, n, fh1, B, start=0, end=0) == errno.EAGAIN
    assert ws.c[0].release(n, fh0).error == 0
    assert setlk(ws, 1, n, fh1, B, start=0, end=0) == 0
    ws.c[1].release(n, fh1)


def test_setlkw_waits_without_stalling_the_worker(ws):
    n = ws.file()
    fh0, fh1 = ws.open(0, n), ws.open(1, n)
    assert setlk(ws, 0, n, fh0, A) == 0
    d = Deferred(ws.servers[1], n, lk_body(fh1, B, start=0, end=4))
    assert d.result is None and ws.servers[1].deferred == 1
    assert d.wait(0.2) is None  # still waiting
    # The waiting worker keeps serving.
    assert ws.c[1].getattr(n).error == 0
    assert ws.c[1].read(n, fh1, 0, 10).body == b"x" * 10
    assert setlk(ws, 0, n, fh0, A, typ=fcntl.F_UNLCK) == 0
    assert d.wait() == 0
    assert ws.servers[1].deferred == 0
    assert setlk(ws, 0, n, fh0, A, start=0, end=0) == errno.EAGAIN  # B holds it now
    ws.c[0].release(n, fh0)
    ws.c[1].release(n, fh1)


def test_setlkw_free_lock_answers_at_once(ws):
    n = ws.file()
    fh = ws.open(0, n)
    d = Deferred(ws.servers[0], n, lk_body(fh, A))
    assert d.result == 16 and ws.servers[0].deferred == 0
    ws.c[0].release(n, fh)


def test_interrupt_cancels_a_waiting_setlkw(ws):
    n = ws.file()
    fh0, fh1 = ws.open(0, n), ws.open(1, n)
    assert setlk(ws, 0, n, fh0, A) == 0
    d = Deferred(ws.servers[1], n, lk_body(fh1, B), unique=88)
    assert d.result is None
    time.sleep(0.05)  # let the waiter block in fcntl
    # INTERRUPT of a request that is not waiting (finished already) is harmless.
    assert ws.c[1].call(Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(12345),
                        writable=[]).written == 0
    assert ws.c[1].call(Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(88),
                        writable=[]).written == 0
    assert d.wait() == errno.EINTR
    assert setlk(ws, 1, n, fh1, B, start=0, end=0) == errno.EAGAIN  # B did not get it
    ws.c[0].release(n, fh0)
    ws.c[1].release(n, fh1)


def test_cancel_deferred_and_destroy(ws):
    n = ws.file()
    fh0, fh1 = ws.open(0, n), ws.open(1, n)
    assert setlk(ws, 0, n, fh0, A) == 0
    d = Deferred(ws.servers[1], n, lk_body(fh1, B))
    assert ws.servers[1].cancel_deferred() == 1
    assert d.wait() == errno.ENOLCK
    # A waiter cut off by the end of the session is never answered.
    d2 = Deferred(ws.servers[1], n, lk_body(fh1, C), unique=99)
    ws.servers[1].destroy()
    assert d2.wait(0.5) is None and ws.servers[1].deferred == 0
    ws.servers[1].start_session(ws.servers[0].session)
    ws.c[0].release(n, fh0)


def test_flock_is_per_open_file(ws):
    n = ws.file()
    fh0, fh1, fh2 = ws.open(0, n), ws.open(1, n), ws.open(1, n)
    assert setlk(ws, 0, n, fh0, fh0, flock=True) == 0
    assert setlk(ws, 1, n, fh1, fh1, flock=True) == errno.EAGAIN
    assert setlk(ws, 1, n, fh2, fh2, flock=True, typ=fcntl.F_RDLCK) == errno.EAGAIN
    # POSIX and flock locks do not interact.
    assert setlk(ws, 1, n, fh1, B) == 0
    d = Deferred(ws.servers[1], n, lk_body(fh1, fh1, flock=True))
    assert d.result is None
    assert ws.c[0].release(n, fh0).error == 0  # closing drops the flock lock
    assert d.wait() == 0
    assert setlk(ws, 1, n, fh2, fh2, flock=True, typ=fcntl.F_RDLCK) == errno.EAGAIN
    assert setlk(ws, 1, n, fh1, fh1, flock=True, typ=fcntl.F_UNLCK) == 0
    assert setlk(ws, 1, n, fh2, fh2, flock=True, typ=fcntl.F_RDLCK) == 0
    ws.c[1].release(n, fh1)
    ws.c[1].release(n, fh2)


def test_bad_lock_requests(ws):
    n = ws.file()
    fh = ws.open(0, n)
    assert setlk(ws, 0, n, fh, A, start=10, end=5) == errno.EINVAL
    assert setlk(ws, 0, n, fh, A, typ=99) == errno.EINVAL
    assert setlk(ws, 1, n, fh, A) == errno.EBADF  # not worker 1's fh
    d = ws.c[0].opendir(ROOT_ID)
    dfh = open_fh(d)[0]
    assert setlk(ws, 0, ROOT_ID, dfh, dfh, flock=True) == errno.EBADF
    ws.c[0].release(ROOT_ID, dfh, Opcode.RELEASEDIR)
    # A read-only open can still hold write locks of the owner: the OFD is the server's.
    ro = ws.open(1, n, os.O_RDONLY)
    assert setlk(ws, 1, n, ro, B, start=200, end=300) == 0
    ws.c[0].release(n, fh)
    ws.c[1].release(n, ro)


def test_options_disable_lock_negotiation(tmp_path):
    w = Workers(tmp_path, n=1, posix_lock=False, flock=False)
    try:
        s = w.servers[0].session
        assert not s.has(abi.InitFlags.POSIX_LOCKS) and not s.has(abi.InitFlags.FLOCK_LOCKS)
    finally:
        w.close()
