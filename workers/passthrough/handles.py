"""Open file and directory handles of this worker, keyed by the fh the guest sees.

fh = make_fh(worker_index, local): the supervisor routes every fh-carrying op to the owner
(vfsd/dispatch/fh.py); an fh this worker did not issue is EBADF.

local (48 bits) = incarnation (12 bits) | counter (36 bits): a respawned worker (new
incarnation) never mistakes a handle its dead predecessor gave the guest for one of its own.
The counter wraps, skipping values still open.
"""

from __future__ import annotations

import errno
import os

from vfsd.dispatch.fh import fh_local, fh_owner, make_fh

_COUNTER_BITS = 36
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
_INCARNATION_MASK = 0xFFF


class Handle:
    __slots__ = ("fd", "flags", "is_dir", "nodeid")

    def __init__(self, fd: int, nodeid: int, flags: int, is_dir: bool) -> None:
        self.fd = fd
        self.nodeid = nodeid
        self.flags = flags
        self.is_dir = is_dir


class HandleTable:
    def __init__(self, worker_index: int, incarnation: int = 0) -> None:
        self.worker_index = worker_index
        self._base = (incarnation & _INCARNATION_MASK) << _COUNTER_BITS
        self._handles: dict[int, Handle] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle: Handle) -> int:
        while True:
            local = self._base | self._next
            self._next = (self._next + 1) & _COUNTER_MASK or 1
            if local not in self._handles:
                break
        self._handles[local] = handle
        return make_fh(self.worker_index, local)

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
        return h

    def close_all(self) -> None:
        handles, self._handles = self._handles, {}
        for h in handles.values():
            os.close(h.fd)
