"""One request queue's used ring, written by every process that completes its requests.

Workers return their own chains to the guest: they write the used elements, publish
`used.idx`, decide the interrupt with EVENT_IDX and write the call eventfd, so a completion
never waits for the supervisor to wake up. The supervisor writes the same ring for the
requests it answers itself (INIT, DESTROY, errors, a dead worker's requests).

What the writers share (`UsedLock`, created before the workers are forked, one per queue):

* a robust, process-shared mutex (`vfsd/robust.py`), held around every update of the ring.
  When its holder dies (SIGKILL at any instant), the next locker is told so (EOWNERDEAD)
  and finishes the dead holder's update from the journal before going on;
* `owner`: who holds the mutex (a worker's index + 1, or SUPERVISOR), for diagnostics and
  to name the dead holder's pending words;
* a journal (`start`, `count`), written once the elements are in place: whoever recovers
  the mutex finishes the publication of a journaled update;
* `signalled_used` (+ valid), the EVENT_IDX state of the last interrupt decision;
* `call_gen`, bumped when the call fd changes: a writer re-reads its control channel before
  it signals with a stale fd;
* `pending[head]`: who may complete `head` (worker index + 1; 0 = the supervisor or
  nobody). The supervisor sets it when it routes the head; the completer checks and clears it
  under the lock, so a head reaches the used ring exactly once.

Every field another process reads concurrently is one aligned store (memoryview casts).
"""

from __future__ import annotations

import logging
import mmap
import os
from array import array
from collections.abc import Callable

import posix_ipc

from vfsd import robust
from vfsd.fence import full_fence
from vfsd.transport.abi import MAX_QUEUE_SIZE, VRING_AVAIL_F_NO_INTERRUPT, used_ring_size
from vfsd.transport.memory import GuestMemory
from vfsd.transport.virtqueue import vring_need_event

log = logging.getLogger("vfsd.used")

SUPERVISOR = 0xFFFF  # the `owner` value of the supervisor (workers are index + 1)
# u32 words after the mutex
_OWNER, _START, _COUNT, _SIGNALLED, _SIGNALLED_VALID, _CALL_GEN = range(6)
_WORDS = 64  # byte offset of the words (the mutex comes first)
OWNER_OFFSET = _WORDS + 4 * _OWNER  # where a debugger (or a test) finds the owner word
_HEADER = 128
_SIZE = _HEADER + 2 * MAX_QUEUE_SIZE


class UsedLock:
    """The shared state of one queue's used ring (see the module doc)."""

    def __init__(self, queue: int) -> None:
        self.queue = queue
        shm = posix_ipc.SharedMemory(f"/vfsd-{os.getpid()}-used{queue}", posix_ipc.O_CREX,
                                     size=_SIZE)
        try:
            self._map = mmap.mmap(shm.fd, _SIZE)
        finally:
            shm.close_fd()
            shm.unlink()  # forked workers inherit the mapping; nothing is left behind
        self.mutex = robust.address(self._map, 0)
        robust.init(self.mutex)
        view = memoryview(self._map)
        self.words = view[_WORDS:_HEADER].cast("I")
        self.pending = view[_HEADER:_SIZE].cast("H")

    def reset(self) -> None:
        """A new ring layout or base (the queue is stopped): no decision to compare with."""
        self.words[_SIGNALLED_VALID] = 0

    @property
    def owner(self) -> int:
        return self.words[_OWNER]

    @property
    def call_gen(self) -> int:
        return self.words[_CALL_GEN]

    def bump_call_gen(self) -> None:
        """After the new call fd was sent to every worker (supervisor only)."""
        self.words[_CALL_GEN] = (self.words[_CALL_GEN] + 1) & 0xFFFFFFFF

    def acquire(self, owner: int, used: UsedRing | None) -> None:
        """Take the mutex for `owner`; if its holder died, finish the holder's update first
        (through `used`, this process's view of the ring)."""
        err = robust.lock(self.mutex)
        if err and robust.check(self.mutex, err, f"queue {self.queue} used ring"):
            self._finish(used)
            robust.consistent(self.mutex)
        self.words[_OWNER] = owner

    def release(self) -> None:
        self.words[_OWNER] = 0
        robust.unlock(self.mutex)

    def _finish(self, used: UsedRing | None) -> None:
        """The holder died inside. A journaled update had its elements in place: clear its
        pending words and publish it. Anything not journaled was not published and stays
        pending (the supervisor answers it for the dead worker). The EVENT_IDX state may
        lag, so the next decision interrupts; and the guest is interrupted now (the dead
        holder may not have)."""
        words = self.words
        dead = words[_OWNER]
        count = words[_COUNT]
        if count and used is not None and used.mapped:
            start = words[_START]
            for head in used.heads(start, count):
                if self.pending[head] == dead:
                    self.pending[head] = 0
            if used.used_idx() == start:  # not published yet
                used.publish((start + count) & 0xFFFF)
        words[_COUNT] = 0
        words[_SIGNALLED_VALID] = 0
        log.warning("queue %d: a process (owner %d) died holding the used-ring lock; its "
                    "update was %s", self.queue, dead, "finished" if count else "not begun")
        if used is not None:
            used.signal()

    def close(self) -> None:
        self.words.release()
        self.pending.release()
        try:
            self._map.close()
        except BufferError:
            pass


class UsedRing:
    """One process's writer of a queue's used ring: its own views of guest memory, its
    own dup of the call fd, the shared `UsedLock`."""

    __slots__ = ("_avail", "_elems", "_mask", "_used", "_used_event_at", "call_fd",
                 "call_gen_seen", "event_idx", "lock", "me", "refresh", "size")

    def __init__(self, lock: UsedLock, me: int) -> None:
        self.lock = lock
        self.me = me  # SUPERVISOR or worker index + 1
        self.call_fd: int | None = None
        self.call_gen_seen = lock.call_gen
        # Worker: re-reads the control channel when `call_gen` moved (a new call fd).
        self.refresh: Callable[[], None] | None = None
        self.event_idx = False
        self.size = 0
        self._mask = 0
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._elems: memoryview | None = None
        self._used_event_at = 0

    def map(self, mem: GuestMemory, size: int, avail_gpa: int, used_gpa: int,
            event_idx: bool) -> None:
        """Views of the ring in `mem` (raises GuestMemoryError outside it)."""
        avail = mem.view(avail_gpa, 4 + 2 * size + 2)
        used = mem.view(used_gpa, used_ring_size(size))
        self.size = size
        self._mask = size - 1
        self._avail = avail.cast("H")
        self._used = used.cast("H")
        self._elems = used[4 : 4 + 8 * size].cast("Q")
        self._used_event_at = 2 + size
        self.event_idx = event_idx

    def unmap(self) -> None:
        self._avail = self._used = self._elems = None

    @property
    def mapped(self) -> bool:
        return self._used is not None

    def used_idx(self) -> int:
        assert self._used is not None
        return self._used[1]

    def publish(self, idx: int) -> None:
        """Store used.idx (one aligned u16 store; release order is free on x86). From here
        on the guest may reuse the heads: nothing of theirs is touched after it."""
        assert self._used is not None
        self._used[1] = idx

    def heads(self, start: int, count: int) -> list[int]:
        """The heads of `count` used elements from index `start` (repair)."""
        assert self._elems is not None
        return [self._elems[(start + i) & self._mask] & 0xFFFFFFFF for i in range(count)]

    def set_call_fd(self, fd: int | None) -> None:
        old, self.call_fd = self.call_fd, fd
        if old is not None and old != fd:
            os.close(old)

    def complete(self, elems: list[int], heads: list[int], owner: int | None = None) -> int:
        """Return chains to the guest: `elems` are used elements (`head | len << 32`) of
        `heads`, each completed only if its pending word is `owner` (default: this
        writer's; 0 for heads the supervisor never routed). Interrupts the guest if
        EVENT_IDX (or NO_INTERRUPT) says so. Returns how many were written; the rest were
        answered by someone else already."""
        used, elems_view, avail = self._used, self._elems, self._avail
        if used is None or elems_view is None or avail is None:
            return 0
        lock = self.lock
        pending = lock.pending
        want = self.me if owner is None else owner
        lock.acquire(self.me, self)
        try:
            if any(pending[h] != want for h in heads):
                keep = [i for i, h in enumerate(heads) if pending[h] == want]
                elems = [elems[i] for i in keep]
                heads = [heads[i] for i in keep]
            n = len(elems)
            if not n:
                return 0
            words = lock.words
            idx = used[1]
            start = idx & self._mask
            end = start + n
            if end <= self.size:
                elems_view[start:end] = array("Q", elems)
            else:
                split = self.size - start
                elems_view[start:] = array("Q", elems[:split])
                elems_view[: end - self.size] = array("Q", elems[split:])
            # Journal, then clear the pending words *before* publishing: once used.idx moves
            # the guest may reuse a head at once, and the supervisor then routes it anew.
            words[_START] = idx
            words[_COUNT] = n
            for h in heads:
                pending[h] = 0
            new = (idx + n) & 0xFFFF
            self.publish(new)
            words[_COUNT] = 0
            full_fence()  # store used.idx -> load used_event / avail.flags
            if self.event_idx:
                old = words[_SIGNALLED]
                valid = words[_SIGNALLED_VALID]
                words[_SIGNALLED] = new
                words[_SIGNALLED_VALID] = 1
                notify = not valid or vring_need_event(avail[self._used_event_at], new, old)
            else:
                notify = not avail[0] & VRING_AVAIL_F_NO_INTERRUPT
        finally:
            lock.release()
        if notify:
            # After publishing (the fence above): a call fd changed before this load is
            # fetched now; one changed after it is covered by the supervisor's own signal.
            if lock.words[_CALL_GEN] != self.call_gen_seen and self.refresh is not None:
                self.refresh()
            self.signal()
        return n

    def signal(self) -> None:
        if self.call_fd is not None:
            os.eventfd_write(self.call_fd, 1)

    def recover(self) -> None:
        """Take and release the lock: if a dead process held it, its update is finished
        now (the supervisor, after a worker died)."""
        self.lock.acquire(self.me, self)
        self.lock.release()

    def close(self) -> None:
        self.unmap()
        self.set_call_fd(None)
