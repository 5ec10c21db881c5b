"""Open file and directory handles of this worker, keyed by the fh the guest sees.

fh = make_fh(worker_index, local): the supervisor routes every fh-carrying op to the owner
(vfsd/dispatch/fh.py); an fh this worker did not issue is EBADF — except READ and WRITE,
which the supervisor may send to a less busy worker: that worker *borrows* the owner's fd
for the one operation (`LENDING`, pidfd_getfd(2): the same open file description, so
O_APPEND, O_DIRECT and the file offset behave as on the owner) and closes it right after,
so a borrowed fd never outlives the request (flock locks and unlinked files go with the
owner's close, as before).

local (48 bits) = incarnation (12 bits) | sequence (24 bits) | lending slot (12 bits): a
respawned worker (new incarnation) never mistakes a handle its dead predecessor gave the
guest for one of its own; the slot says where the owner published (pid, fd, nodeid,
flags) for borrowers (`NO_SLOT` when all are taken: that handle is served by its owner
only, and is lost if the owner dies). A respawned worker reopens its predecessor's
published handles (`orphans` / `adopt`) and serves their fhs as they are.
"""

from __future__ import annotations

import errno
import mmap
import os

from vfsd.dispatch.fh import FH_NO_SLOT, FH_SLOT_BITS, MAX_WORKERS, fh_local, fh_owner, make_fh
from workers.passthrough.syscalls import pidfd_getfd

_COUNTER_BITS = 36
_INCARNATION_MASK = 0xFFF
_SLOT_BITS = FH_SLOT_BITS
SLOTS = 1 << _SLOT_BITS  # lending slots per worker (the last one means "not lent")
NO_SLOT = FH_NO_SLOT
_SEQ_MASK = (1 << (_COUNTER_BITS - _SLOT_BITS)) - 1
_IS_DIR = 1 << 31  # in the published fd word
_DIR_HANDLE = 1 << 62  # in the published flags word (it outlives the fd word)


class Lending:
    """Per worker and lending slot, four u64 in shared memory: the fh (0 = free);
    fd | is_dir << 31 | owner pid << 32 (0 while nobody holds it); the nodeid; the open
    flags. Created at import, that is in the supervisor before any worker is forked, so
    every worker maps the same table.

    The owner writes the other words, then the fh (publish); on release it clears the fh
    before it closes the fd. A borrower checks the fh, duplicates the fd, and checks the fh
    and the fd word again: equal means the duplicate is the handle's description (x86 keeps
    stores in order, and the close that could recycle the fd number comes after the
    clearing store). When a worker dies the supervisor clears its fd words (`orphan`)
    before reaping it, so its pid cannot be reused under a borrower; the fh, nodeid and
    flags stay for the replacement worker, which reopens those files (`orphans`) and serves
    the guest's fhs on.
    """

    def __init__(self, workers: int = MAX_WORKERS) -> None:
        self.workers = workers
        self._mm = mmap.mmap(-1, 32 * SLOTS * workers)  # MAP_SHARED | MAP_ANONYMOUS, lazy
        self._q = memoryview(self._mm).cast("Q")
        self._pidfds: dict[int, int] = {}  # borrower side: owner pid -> pidfd

    def publish(self, owner: int, slot: int, fh: int, handle: Handle) -> None:
        if slot == NO_SLOT or owner >= self.workers or handle.fd < 0:
            return
        b = 4 * (owner * SLOTS + slot)
        q = self._q
        q[b + 1] = handle.fd | (_IS_DIR if handle.is_dir else 0) | os.getpid() << 32
        q[b + 2] = handle.nodeid
        q[b + 3] = handle.flags | (_DIR_HANDLE if handle.is_dir else 0)
        q[b] = fh

    def withdraw(self, owner: int, slot: int) -> None:
        if slot != NO_SLOT and owner < self.workers:
            self._q[4 * (owner * SLOTS + slot)] = 0

    def orphan(self, owner: int) -> None:
        """A worker died: nobody may borrow its fds any more (their numbers mean nothing
        now); its fhs stay listed for `orphans`."""
        if owner < self.workers:
            start = 4 * owner * SLOTS
            self._q[start + 1 : start + 4 * SLOTS : 4] = memoryview(bytes(8 * SLOTS)).cast("Q")

    def orphans(self, owner: int) -> list[tuple[int, int, int, int, bool]]:
        """(slot, fh, nodeid, flags, is_dir) of every handle a dead predecessor left."""
        if owner >= self.workers:
            return []
        q = self._q
        start = 4 * owner * SLOTS
        return [(slot, q[b], q[b + 2], q[b + 3] & ~_DIR_HANDLE, bool(q[b + 3] & _DIR_HANDLE))
                for slot, b in enumerate(range(start, start + 4 * SLOTS, 4)) if q[b]]

    def borrow(self, fh: int) -> tuple[int, bool]:
        """(a duplicate of the owner's fd for `fh`, is_dir). The caller closes the fd.
        Raises EBADF for an fh that is not (or no longer) open in a live worker."""
        owner = fh_owner(fh)
        slot = fh & NO_SLOT
        if slot == NO_SLOT or not 0 <= owner < self.workers:
            raise OSError(errno.EBADF, "unknown file handle")
        q = self._q
        b = 4 * (owner * SLOTS + slot)
        if q[b] != fh:
            raise OSError(errno.EBADF, "unknown file handle")
        word = q[b + 1]
        if not word:
            raise OSError(errno.EBADF, "file handle of a dead worker")
        try:
            fd = self._getfd(word >> 32, word & (_IS_DIR - 1))
        except OSError as e:
            raise OSError(errno.EBADF, f"cannot borrow the file handle: {e}") from e
        if q[b] != fh or q[b + 1] != word:  # released or orphaned meanwhile: the number may
            os.close(fd)  # be another file's now
            raise OSError(errno.EBADF, "file handle released")
        return fd, bool(word & _IS_DIR)

    def _getfd(self, pid: int, fd: int) -> int:
        """A duplicate of fd `fd` of process `pid` (pidfds are cached per owner pid)."""
        if pid == os.getpid():  # two file systems in one process (tests)
            return os.dup(fd)
        pidfd = self._pidfds.get(pid)
        if pidfd is not None:
            try:
                return pidfd_getfd(pidfd, fd)
            except ProcessLookupError:
                # The cached pidfd's process is gone; its pid may now be a new worker's.
                os.close(self._pidfds.pop(pid))
        pidfd = self._pidfds[pid] = os.pidfd_open(pid)
        return pidfd_getfd(pidfd, fd)


LENDING = Lending()


class Handle:
    __slots__ = ("fd", "flags", "is_dir", "nodeid")

    def __init__(self, fd: int, nodeid: int, flags: int, is_dir: bool) -> None:
        self.fd = fd
        self.nodeid = nodeid
        self.flags = flags
        self.is_dir = is_dir


class HandleTable:
    def __init__(self, worker_index: int, incarnation: int = 0,
                 lending: Lending = LENDING) -> None:
        self.worker_index = worker_index
        self._base = (incarnation & _INCARNATION_MASK) << _COUNTER_BITS
        self._handles: dict[int, Handle] = {}
        self._seq = 0
        self._free_slots = list(range(NO_SLOT - 1, -1, -1))
        self._lending = lending

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle: Handle) -> int:
        slot = self._free_slots.pop() if self._free_slots else NO_SLOT
        while True:
            self._seq = (self._seq + 1) & _SEQ_MASK or 1
            local = self._base | self._seq << _SLOT_BITS | slot
            if local not in self._handles:
                break
        self._handles[local] = handle
        fh = make_fh(self.worker_index, local)
        self._lending.publish(self.worker_index, slot, fh, handle)
        return fh

    def orphans(self) -> list[tuple[int, int, int, int, bool]]:
        """(slot, fh, nodeid, flags, is_dir) of the handles a dead predecessor left open."""
        return self._lending.orphans(self.worker_index)

    def adopt(self, slot: int, fh: int, handle: Handle | None) -> None:
        """Serve a dead predecessor's `fh` with `handle` (reopened), or drop it (None)."""
        if handle is None:
            self._lending.withdraw(self.worker_index, slot)
            return
        self._free_slots.remove(slot)
        self._handles[fh_local(fh)] = handle
        self._lending.publish(self.worker_index, slot, fh, handle)

    def find(self, fh: int) -> Handle | None:
        if fh_owner(fh) != self.worker_index:
            return None
        return self._handles.get(fh_local(fh))

    def get(self, fh: int) -> Handle:
        h = self.find(fh)
        if h is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return h

    def pop(self, fh: int) -> Handle:
        if fh_owner(fh) != self.worker_index:
            raise OSError(errno.EBADF, "unknown file handle")
        h = self._handles.pop(fh_local(fh), None)
        if h is None:
            raise OSError(errno.EBADF, "unknown file handle")
        self._release_slot(fh & NO_SLOT)
        return h

    def _release_slot(self, slot: int) -> None:
        if slot != NO_SLOT:
            self._lending.withdraw(self.worker_index, slot)  # before the caller closes the fd
            self._free_slots.append(slot)

    def close_all(self) -> None:
        handles, self._handles = self._handles, {}
        for local, h in handles.items():
            self._release_slot(local & NO_SLOT)
            os.close(h.fd)
