"""The shared used ring: several processes return chains of one queue (vfsd/dispatch/used.py).

Guest memory is a memfd mapped by every writer, as the workers map QEMU's.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time

import pytest

from vfsd import robust
from vfsd.dispatch.used import SUPERVISOR, UsedLock, UsedRing
from vfsd.transport.memory import GuestMemory, MemRegion
from vfsd.transport.virtqueue import vring_need_event

SIZE = 256
AVAIL, USED = 0x1000, 0x2000  # guest-physical addresses of the rings
USED_EVENT_AT = AVAIL + 4 + 2 * SIZE  # avail ring: flags, idx, ring[SIZE], used_event


class Guest:
    """A memfd of guest RAM and the driver's view of the used ring."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("guest")
        os.ftruncate(self.fd, 1 << 16)
        self.region = MemRegion(0, 1 << 16, 0x7F0000000000, 0)
        self.mem = GuestMemory.from_regions([(self.region, self.fd)])

    def writer(self, lock: UsedLock, me: int, event_idx: bool = True) -> tuple[UsedRing, int]:
        """A writer with its own mapping and a fresh call eventfd (returned)."""
        mem = GuestMemory.from_regions([(self.region, self.fd)])
        writer = UsedRing(lock, me)
        writer.map(mem, SIZE, AVAIL, USED, event_idx)
        call = os.eventfd(0, os.EFD_NONBLOCK)
        writer.set_call_fd(os.dup(call))
        return writer, call

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.mem.view(USED + 2, 2))[0]

    def used_heads(self, count: int) -> list[int]:
        elems = self.mem.view(USED + 4, 8 * SIZE).cast("Q")
        return [elems[i % SIZE] & 0xFFFFFFFF for i in range(count)]

    def set_used_event(self, value: int) -> None:
        struct.pack_into("<H", self.mem.view(USED_EVENT_AT, 2), 0, value)


def signals(call: int) -> int:
    try:
        return os.eventfd_read(call)
    except BlockingIOError:
        return 0


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.mem.close()
    os.close(g.fd)


@pytest.fixture
def lock():
    shared = UsedLock(1)
    yield shared
    shared.close()


def test_every_head_once_from_four_concurrent_writers(guest, lock):
    """Four processes return 64 heads each in random batches: the used ring ends with
    every head exactly once, used.idx counts them all, no pending word is left."""
    heads = list(range(SIZE))
    random.Random(7).shuffle(heads)
    mine = {w: heads[w * 64 : (w + 1) * 64] for w in range(4)}
    for w, hs in mine.items():
        for h in hs:
            lock.pending[h] = w + 1
    guest.set_used_event(0xFFFF)
    pids = []
    for w, hs in mine.items():
        pid = os.fork()
        if pid == 0:  # a worker
            try:
                writer, _call = guest.writer(lock, w + 1)
                rng = random.Random(w)
                i = 0
                while i < len(hs):
                    n = rng.randint(1, 8)
                    batch = hs[i : i + n]
                    assert writer.complete([h | (h + 7) << 32 for h in batch], batch) == len(batch)
                    i += n
                os._exit(0)
            except BaseException:
                os._exit(1)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert guest.used_idx() == SIZE
    assert sorted(guest.used_heads(SIZE)) == list(range(SIZE))
    elems = guest.mem.view(USED + 4, 8 * SIZE).cast("Q")
    assert all(e >> 32 == (e & 0xFFFFFFFF) + 7 for e in elems)  # lengths travel with heads
    assert not any(lock.pending[h] for h in range(SIZE))
    assert lock.owner == 0


def test_a_head_is_returned_once_whoever_tries(guest, lock):
    """Only the writer the head was routed to may return it; the supervisor's own heads
    (never routed) have pending 0; a second return of the same head is refused."""
    a, _ = guest.writer(lock, 1)
    b, _ = guest.writer(lock, 2)
    sup, _ = guest.writer(lock, SUPERVISOR)
    lock.pending[5] = 1
    assert b.complete([5], [5]) == 0  # not b's
    assert a.complete([5 | 16 << 32], [5]) == 1
    assert a.complete([5 | 16 << 32], [5]) == 0  # already returned
    assert sup.complete([9 | 16 << 32], [9], 0) == 1  # INIT, an error reply...
    lock.pending[6] = 2  # a dead worker's head, answered EIO in its name
    assert sup.complete([6 | 16 << 32], [6], 2) == 1
    assert b.complete([6], [6]) == 0
    assert guest.used_heads(guest.used_idx()) == [5, 9, 6]


def test_event_idx_decisions_match_the_single_writer_rule(guest, lock):
    """Shared signalled_used: the writer whose push crosses used_event interrupts, the
    others do not, whichever process they are; the first decision always interrupts."""
    a, call_a = guest.writer(lock, 1)
    b, call_b = guest.writer(lock, 2)
    for h in range(40):
        lock.pending[h] = 1 + h % 2
    guest.set_used_event(0xFFFF)
    old, pushed = 0, 0
    rng = random.Random(3)
    event = 0xFFFF
    first = True
    h = 0
    while h < 40:
        n = rng.randint(1, 4)
        batch = list(range(h, min(h + n, 40)))
        for w, call in ((a, call_a), (b, call_b)):
            mine = [x for x in batch if lock.pending[x] == w.me]
            if not mine:
                continue
            w.complete(mine, mine)
            pushed += len(mine)
            expect = first or vring_need_event(event, pushed, old)
            assert signals(call) == int(expect), (h, pushed, old, event)
            first = False
            old = pushed
        event = pushed + rng.randint(0, 3)  # the driver re-arms a little ahead
        guest.set_used_event(event)
        h += n


def test_no_interrupt_flag_without_event_idx(guest, lock):
    a, call = guest.writer(lock, 1, event_idx=False)
    lock.pending[1] = lock.pending[2] = 1
    struct.pack_into("<H", guest.mem.view(AVAIL, 2), 0, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    a.complete([1], [1])
    assert signals(call) == 0
    struct.pack_into("<H", guest.mem.view(AVAIL, 2), 0, 0)
    a.complete([2], [2])
    assert signals(call) == 1


@pytest.mark.parametrize("state", ["published", "journaled", "unjournaled", "unrecorded"])
def test_a_holder_killed_inside_is_recovered_by_the_next_locker(guest, lock, state):
    """A process SIGKILLed while it holds the lock, at each step of an update: the next
    locker (here the supervisor's `recover`) gets the lock back (robust mutex) and finishes
    a journaled update (published, pending words cleared) whether or not the dead holder got
    to publish it; an unjournaled one stays unpublished and pending, for the supervisor to
    answer in the dead one's name. "unrecorded": killed between taking the lock and writing
    the owner word (which a semaphore could not tell from a live holder)."""
    for h in (3, 4):
        lock.pending[h] = 1
    pid = os.fork()
    if pid == 0:
        if state == "unrecorded":
            robust.lock(lock.mutex)
            os.kill(os.getpid(), signal.SIGKILL)
        lock.acquire(1, None)
        elems = guest.mem.view(USED + 4, 16).cast("Q")
        elems[0], elems[1] = 3 | 16 << 32, 4 | 16 << 32
        if state != "unjournaled":
            lock.words[1], lock.words[2] = 0, 2  # journal: from used.idx 0, two entries
            lock.pending[3] = 0  # died while clearing the pending words
        if state == "published":
            lock.pending[4] = 0
            guest.mem.view(USED, 4).cast("H")[1] = 2
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    sup, call = guest.writer(lock, SUPERVISOR)
    sup.recover()
    assert lock.owner == 0
    if state in ("unjournaled", "unrecorded"):
        assert guest.used_idx() == 0 and [lock.pending[3], lock.pending[4]] == [1, 1]
        assert sup.complete([3, 4], [3, 4], 1) == 2  # EIO in the dead worker's name
    assert [lock.pending[3], lock.pending[4]] == [0, 0]
    assert guest.used_idx() == 2 and sorted(guest.used_heads(2)) == [3, 4]
    assert signals(call) >= 1  # the guest hears of the entries


def test_a_dead_holder_never_blocks_the_next_writer(guest, lock):
    pid = os.fork()
    if pid == 0:
        lock.acquire(1, None)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    sup, _ = guest.writer(lock, SUPERVISOR)
    assert sup.complete([7], [7], 0) == 1
    assert lock.owner == 0


def test_nothing_of_a_head_is_touched_after_publishing(guest, lock):
    """Deterministic twin of the next test: the guest reuses and the supervisor re-routes
    every head right at the used.idx store; their new pending words must survive."""

    class Rerouting(UsedRing):
        __slots__ = ()

        def publish(self, idx: int) -> None:
            super().publish(idx)
            for h in range(8):
                lock.pending[h] = 1  # routed anew, to the same worker

    writer = Rerouting(lock, 1)
    writer.map(guest.mem, SIZE, AVAIL, USED, True)
    for h in range(8):
        lock.pending[h] = 1
    assert writer.complete([h | 16 << 32 for h in range(8)], list(range(8))) == 8
    assert [lock.pending[h] for h in range(8)] == [1] * 8
    assert writer.complete([h | 16 << 32 for h in range(8)], list(range(8))) == 8


def test_a_head_reused_at_once_is_not_lost(guest, lock):
    """The guest may reuse a head the moment used.idx shows it, and the supervisor then
    routes it anew (pending word set without the lock): the writer must not touch that
    head's pending word after publishing, or the new request is dropped (a hang)."""
    batch = 64
    to_worker_r, to_worker_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: returns each batch of heads it is sent in one update
        try:
            os.close(to_worker_w)
            writer, _ = guest.writer(lock, 1)
            with os.fdopen(to_worker_r, "rb", buffering=0) as pipe:
                while len(data := pipe.read(2 * batch)) == 2 * batch:
                    heads = list(struct.unpack(f"<{batch}H", data))
                    writer.complete([h | 16 << 32 for h in heads], heads)
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(to_worker_r)
    guest.set_used_event(0xFFFF)
    seen = 0
    heads = list(range(batch))
    pending = lock.pending
    used = guest.mem.view(USED, 4).cast("H")
    try:
        for h in heads:
            pending[h] = 1
        for _ in range(20000):  # the driver and router: reuse the returned heads at once
            last = heads[-1]  # the writer clears pending words in order: this one last
            os.write(to_worker_w, struct.pack(f"<{batch}H", *heads))
            deadline = time.monotonic() + 5
            while (used[1] - seen) & 0xFFFF < batch:
                assert time.monotonic() < deadline, "a request was lost"
            pending[last] = 1  # routed again the moment the guest could reuse it
            for h in heads:
                pending[h] = 1
            seen = (seen + batch) & 0xFFFF
    finally:
        os.close(to_worker_w)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
