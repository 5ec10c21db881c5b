"""The shared inode table: nodeids, lookup counts, reuse, and multi-process locking."""

import errno
import fcntl
import os
import signal
import time

import pytest

from vfsd.fs.inode_table import ROOT_ID, FileHandle, InodeTable

ROOT_KEY = (1, 2, 3)
ROOT_FH = FileHandle(1, b"root-handle")


def key(i):
    return (64, 1000 + i, 3)


def fh(i):
    # Derived from the key so a torn read would be visible as a mismatch.
    return FileHandle(1, (1000 + i).to_bytes(8, "little") * 2)


@pytest.fixture(params=["memfd", "path"])
def table(request, tmp_path):
    lock = None if request.param == "memfd" else str(tmp_path / "lock")
    t = InodeTable.create(64, lock, name=f"/vfsd-test-{os.getpid()}-t")
    t.set_root(ROOT_KEY, ROOT_FH)
    yield t
    t.close()


def run_child(fn):
    """Fork, run fn() in the child, exit 0 on success / 1 on any exception."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def wait_ok(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("child did not finish")


def test_root_is_nodeid_1_and_permanent(table):
    e = table.get(ROOT_ID)
    assert e is not None and e.key == ROOT_KEY and e.handle == ROOT_FH
    assert table.count() == 1
    table.forget(ROOT_ID, 100)
    assert table.is_live(ROOT_ID)
    table.set_root(ROOT_KEY, ROOT_FH)  # idempotent: every worker calls it
    assert table.count() == 1
    with pytest.raises(ValueError):
        table.set_root((9, 9, 9), ROOT_FH)
    assert table.ref(ROOT_KEY, ROOT_FH) == ROOT_ID  # ".." of a child resolves to the root


def test_ref_finds_or_allocates(table):
    a = table.ref(key(1), fh(1))
    assert a not in (0, ROOT_ID) and a & 0xFFFFFFFF == 2 and a >> 32 == 1
    assert table.ref(key(1), fh(1)) == a  # repeated lookups / hard links: one nodeid
    e = table.get(a)
    assert e.nlookup == 2 and e.key == key(1) and e.handle == fh(1)
    b = table.ref(key(2), fh(2))
    assert b != a and table.count() == 3


def test_forget_frees_at_zero_and_reuse_bumps_generation(table):
    a = table.ref(key(1), fh(1))
    table.ref(key(1), fh(1))
    table.forget(a, 1)
    assert table.get(a).nlookup == 1
    table.forget(a, 1)
    assert table.get(a) is None and not table.is_live(a) and table.count() == 1
    b = table.ref(key(2), fh(2))
    assert b & 0xFFFFFFFF == a & 0xFFFFFFFF  # same slot...
    assert b != a and b >> 32 == 2  # ...never the same nodeid
    table.forget(a, 1)  # a stale FORGET must not touch the slot's new owner
    assert table.get(b).nlookup == 1


def test_forget_more_than_held_and_unknown_ids(table):
    a = table.ref(key(1), fh(1))
    table.forget(a, 99)
    assert not table.is_live(a)
    for bogus in (0, 12345, (7 << 32) | 3, (1 << 64) - 1):
        table.forget(bogus, 1)
        assert table.get(bogus) is None
    assert table.count() == 1


def test_reused_inode_number_with_new_handle_gets_new_nodeid(table):
    a = table.ref(key(1), fh(1))
    b = table.ref(key(1), FileHandle(1, b"other generation"))
    assert a != b
    assert table.get(a).handle == fh(1)


def test_capacity_exhaustion_and_recovery(tmp_path):
    t = InodeTable.create(4, str(tmp_path / "lock"))
    t.set_root(ROOT_KEY, ROOT_FH)
    ids = [t.ref(key(i), fh(i)) for i in range(3)]
    with pytest.raises(OSError) as ei:
        t.ref(key(9), fh(9))
    assert ei.value.errno == errno.ENFILE
    t.forget(ids[1], 1)
    assert t.ref(key(9), fh(9)) not in ids
    t.close()


def test_collision_chains_unlink_from_the_middle(tmp_path):
    t = InodeTable.create(16, str(tmp_path / "lock"), stripes=1)
    t._bmask = 0  # one bucket for everything: every entry shares one chain
    t.set_root(ROOT_KEY, ROOT_FH)
    ids = [t.ref(key(i), fh(i)) for i in range(10)]
    for i in (4, 0, 9):
        t.forget(ids[i], 1)
    for i in range(10):
        if i in (4, 0, 9):
            assert not t.is_live(ids[i])
        else:
            assert t.ref(key(i), fh(i)) == ids[i]
    assert t.ref(ROOT_KEY, ROOT_FH) == ROOT_ID
    t.close()


def test_clear_keeps_root_and_generations(table):
    ids = [table.ref(key(i), fh(i)) for i in range(5)]
    table.clear()
    assert table.count() == 1 and table.get(ROOT_ID).key == ROOT_KEY
    assert all(table.get(i) is None for i in ids)
    assert table.ref(ROOT_KEY, ROOT_FH) == ROOT_ID
    again = [table.ref(key(i), fh(i)) for i in range(5)]
    assert not set(again) & set(ids)


def test_attach_by_name(tmp_path):
    name = f"/vfsd-test-{os.getpid()}-attach"
    t = InodeTable.create(16, str(tmp_path / "lock"), name=name, unlink=False)
    try:
        t.set_root(ROOT_KEY, ROOT_FH)
        a = t.ref(key(1), fh(1))
        other = InodeTable.attach(name, str(tmp_path / "lock"))
        assert other.get(a).key == key(1) and other.count() == 2
        other.close()
    finally:
        t.close()
        import posix_ipc

        posix_ipc.unlink_shared_memory(name)


def test_processes_contend_and_counts_stay_exact(table):
    nproc, rounds, nkeys = 4, 150, 6

    def worker():
        for r in range(rounds):
            for i in range(nkeys):
                table.ref(key(i), fh(i))
            if r % 2:
                for i in range(nkeys):
                    # forget one of ours: find the nodeid via a ref, then give back both
                    n = table.ref(key(i), fh(i))
                    table.forget(n, 2)

    pids = [run_child(worker) for _ in range(nproc)]
    for p in pids:
        wait_ok(p, 120)
    # each process keeps rounds/2 references per key
    for i in range(nkeys):
        n = table.ref(key(i), fh(i))
        assert table.get(n).nlookup == nproc * rounds // 2 + 1
    assert table.count() == 1 + nkeys


def test_processes_churn_allocation_without_losing_slots(table):
    def worker(base):
        for r in range(200):
            n = table.ref(key(base + r % 7), fh(base + r % 7))
            table.forget(n, 1)

    pids = [run_child(lambda b=b: worker(b)) for b in (0, 3, 100)]
    for p in pids:
        wait_ok(p, 120)
    assert table.count() == 1
    assert len({table.ref(key(i), fh(i)) for i in range(40)}) == 40  # capacity 64 intact


def test_lock_free_get_never_returns_torn_entries(table):
    r, w = os.pipe()

    def churn():
        os.close(r)
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:
            n = table.ref(key(i % 3), fh(i % 3))
            table.forget(n, 1)
            i += 1
        os.write(w, b"x")

    pid = run_child(churn)
    os.close(w)
    seen = 0
    deadline = time.monotonic() + 1.4
    while time.monotonic() < deadline:
        for slot in (2, 3, 4):
            gen = table._q[table._ebase + slot * 24 + 1]  # the slot's current generation
            e = table.get(gen << 32 | slot)
            if e is not None:
                seen += 1
                i = e.ino - 1000
                assert e.key == key(i) and e.handle == fh(i)
    wait_ok(pid)
    assert seen > 0
    os.close(r)


def test_killed_lock_holder_does_not_deadlock(table):
    k = key(5)
    stripe = table.stripe_of(k)
    r, w = os.pipe()

    def hold():
        table._lock(stripe)
        os.write(w, b"locked")
        time.sleep(60)

    pid = run_child(hold)
    assert os.read(r, 6) == b"locked"
    # While the child lives the stripe really is taken (non-blocking probe fails)...
    probe = os.open(table.lock_path or f"/proc/self/fd/{table._lock_origin}", os.O_RDWR)
    req = table._locks[stripe]
    with pytest.raises(OSError):
        fcntl.fcntl(probe, fcntl.F_OFD_SETLK, req)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # ...and the kernel released it with the holder.
    signal.alarm(10)
    try:
        n = table.ref(k, fh(5))
    finally:
        signal.alarm(0)
    assert table.get(n).nlookup == 1
    os.close(probe)
    os.close(r)
    os.close(w)


def test_child_gets_its_own_lock_description(table):
    table.open_locks()
    parent_fd = table._lock_fd
    r, w = os.pipe()

    def child():
        assert table._lock_fd == -1  # the inherited description was dropped at fork
        table.open_locks()
        # A shared description would "own" the parent's lock and succeed here.
        try:
            fcntl.fcntl(table._lock_fd, fcntl.F_OFD_SETLK, table._locks[0])
        except BlockingIOError:
            os.write(w, b"k")

    table._lock(0)
    try:
        pid = run_child(child)
        wait_ok(pid)
    finally:
        table._unlock(0)
    assert table._lock_fd == parent_fd
    assert os.read(r, 1) == b"k"
    os.close(r)
    os.close(w)


def test_memfd_lock_file_leaves_nothing_behind(tmp_path):
    before = set(os.listdir("/dev/shm"))
    t = InodeTable.create(16)
    t.set_root(ROOT_KEY, ROOT_FH)
    assert t.lock_path is None and t.ref(key(1), fh(1))
    assert set(os.listdir("/dev/shm")) == before
    t.close()
