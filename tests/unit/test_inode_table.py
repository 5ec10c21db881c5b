"""The shared inode table: nodeids, lookup counts, reuse, and multi-process locking."""

import errno
import os
import random
import signal
import time

import pytest

from vfsd import robust
from vfsd.fs.inode_table import (
    _ENTRY_Q,
    _STRIPE_Q,
    E_NEXT,
    H_FREE,
    H_NEXT_UNUSED,
    ROOT_ID,
    S_FREE,
    FileHandle,
    InodeTable,
)

ROOT_KEY = (1, 2, 3)
ROOT_FH = FileHandle(1, b"root-handle")


def key(i):
    return (64, 1000 + i, 3)


def fh(i):
    # Derived from the key so a torn read would be visible as a mismatch.
    return FileHandle(1, (1000 + i).to_bytes(8, "little") * 2)


@pytest.fixture(params=[64, 1], ids=["striped", "one-stripe"])
def table(request):
    t = InodeTable.create(64, name=f"/vfsd-test-{os.getpid()}-t", stripes=request.param)
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
    # The inode number comes back with a new file (new handle): the freed slot is reused...
    b = table.ref(key(1), FileHandle(1, b"recreated"))
    assert b & 0xFFFFFFFF == a & 0xFFFFFFFF
    assert b != a and b >> 32 == 2  # ...never the same nodeid
    table.forget(a, 1)  # a stale FORGET must not touch the slot's new owner
    assert table.get(b).nlookup == 1
    c = table.ref(key(2), fh(2))
    assert c not in (a, b) and table.count() == 3


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


def test_capacity_exhaustion_and_recovery():
    t = InodeTable.create(4)
    t.set_root(ROOT_KEY, ROOT_FH)
    ids = [t.ref(key(i), fh(i)) for i in range(3)]
    with pytest.raises(OSError) as ei:
        t.ref(key(9), fh(9))
    assert ei.value.errno == errno.ENFILE
    t.forget(ids[1], 1)
    assert t.ref(key(9), fh(9)) not in ids
    t.close()


def test_collision_chains_unlink_from_the_middle():
    t = InodeTable.create(16, stripes=1)
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


def test_attach_by_name():
    name = f"/vfsd-test-{os.getpid()}-attach"
    t = InodeTable.create(16, name=name, unlink=False)
    try:
        t.set_root(ROOT_KEY, ROOT_FH)
        a = t.ref(key(1), fh(1))
        other = InodeTable.attach(name)
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
    # While the child lives the stripe really is taken (a try-lock fails)...
    assert robust.trylock(table._locks[stripe]) == errno.EBUSY
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # ...and the kernel marked it as its holder's death (robust mutex): the next locker
    # recovers it instead of waiting forever.
    signal.alarm(10)
    try:
        n = table.ref(k, fh(5))
        assert table.ref(k, fh(5)) == n
    finally:
        signal.alarm(0)
    assert table.get(n).nlookup == 2
    assert robust.trylock(table._locks[stripe]) == 0  # consistent again, and free
    robust.unlock(table._locks[stripe])
    os.close(r)
    os.close(w)


def test_locks_are_shared_between_processes(table):
    r, w = os.pipe()

    def child():
        # The parent holds stripe 0 through the inherited mapping: so do we not.
        os.write(w, b"b" if robust.trylock(table._locks[0]) == errno.EBUSY else b"x")

    table._lock(0)
    try:
        pid = run_child(child)
        wait_ok(pid)
    finally:
        table._unlock(0)
    assert os.read(r, 1) == b"b"
    os.close(r)
    os.close(w)


def test_table_leaves_nothing_behind():
    before = set(os.listdir("/dev/shm"))
    t = InodeTable.create(16)
    t.set_root(ROOT_KEY, ROOT_FH)
    assert t.ref(key(1), fh(1))
    assert set(os.listdir("/dev/shm")) == before
    t.close()


def check_structure(t):
    """The invariants a crash may not break: chains and free lists are finite and disjoint,
    every entry on a chain is live and hashes to it, a live key+handle is on one chain at
    most once, no live slot is on a free list. Returns {key: nodeid} of what is reachable."""
    q = t._q
    seen, reachable = set(), {}
    for b in range(t._nbuckets):
        slot = q[t._bbase + b]
        while slot:
            assert slot not in seen, "slot on two chains (or a cycle)"
            seen.add(slot)
            e = t._ebase + slot * _ENTRY_Q
            nodeid = q[e]
            assert nodeid & 0xFFFFFFFF == slot, "a freed entry left on a chain"
            ent = t.get(nodeid)
            assert t.stripe_of(ent.key) == b & t._smask and (ent.key, ent.handle) not in reachable
            reachable[(ent.key, ent.handle)] = nodeid
            slot = q[e + E_NEXT]
    free_lists = [q[H_FREE]] + [q[t._sbase + i * _STRIPE_Q + S_FREE] for i in range(t._nstripes)]
    for slot in free_lists:
        while slot:
            assert slot not in seen, "a slot both live (or free twice) and on a free list"
            assert slot < q[H_NEXT_UNUSED]
            seen.add(slot)
            assert q[t._ebase + slot * _ENTRY_Q] == 0
            slot = q[t._ebase + slot * _ENTRY_Q + E_NEXT]
    return {k: n for (k, _h), n in reachable.items()}


def test_full_table_takes_back_slots_other_stripes_freed():
    t = InodeTable.create(8)  # 64 stripes: every key below lands in its own stripe's list
    t.set_root(ROOT_KEY, ROOT_FH)
    ids = [t.ref(key(i), fh(i)) for i in range(7)]
    for n in ids:
        t.forget(n, 1)  # seven slots, each on the free list of the stripe it was freed in
    fresh = [t.ref(key(100 + i), fh(100 + i)) for i in range(7)]  # other stripes: drained
    assert len(set(fresh)) == 7 and t.count() == 8 and not set(fresh) & set(ids)
    with pytest.raises(OSError) as ei:
        t.ref(key(200), fh(200))
    assert ei.value.errno == errno.ENFILE
    assert check_structure(t)[key(100)] == fresh[0]
    t.close()


def test_processes_agree_on_one_nodeid_per_inode(table):
    """Two processes race to look up the same inodes, then hammer lookup/forget on them
    while each keeps one reference: every answer for an inode is the same nodeid."""
    nkeys = 8
    r, w = os.pipe()

    def worker():
        held = [table.ref(key(i), fh(i)) for i in range(nkeys)]
        for r_ in range(300):
            i = r_ % nkeys
            n = table.ref(key(i), fh(i))
            assert n == held[i]
            table.forget(n, 1)
        os.write(w, b"".join(n.to_bytes(8, "little") for n in held))

    pids = [run_child(worker) for _ in range(2)]
    for p in pids:
        wait_ok(p, 120)
    got = [os.read(r, 8 * nkeys) for _ in pids]
    assert got[0] == got[1]
    held = [int.from_bytes(got[0][8 * i:8 * i + 8], "little") for i in range(nkeys)]
    assert [table.get(n).nlookup for n in held] == [2] * nkeys
    for n in held:
        table.forget(n, 2)
    assert table.count() == 1
    check_structure(table)
    os.close(r)
    os.close(w)


def test_processes_killed_mid_update_leave_a_sound_table(table, caplog):
    """SIGKILL lookup/forget/allocation churners at random instants, many times: no lock
    stays taken, chains and free lists stay sound, and the table keeps exact counts for
    everyone else. (A killed process may leak a slot: the table has room for that.)"""
    rng = random.Random(1234)

    def churn(seed):
        i = seed
        while True:
            k = i % 11
            n = table.ref(key(k), fh(k))
            table.ref(key(k), fh(k))
            table.forget(n, 2)
            i += 7

    for round_ in range(12):
        pids = [run_child(lambda s=s: churn(s)) for s in (round_, round_ + 3)]
        time.sleep(rng.uniform(0.005, 0.05))
        for p in pids:
            os.kill(p, signal.SIGKILL)
        for p in pids:
            os.waitpid(p, 0)
        signal.alarm(20)  # a wedged lock would hang here
        try:
            for i in range(table._nstripes + 1):
                table._lock(i)
                table._unlock(i)
            reachable = check_structure(table)
            for k in range(11):  # counts still exact for a surviving user
                n = table.ref(key(k), fh(k))
                before = table.get(n).nlookup
                assert table.ref(key(k), fh(k)) == n and table.get(n).nlookup == before + 1
                table.forget(n, 2)
                assert reachable.get(key(k), n) == n
        finally:
            signal.alarm(0)
    # Some kills landed inside a critical section, and this process recovered those locks.
    assert "died holding" in caplog.text
