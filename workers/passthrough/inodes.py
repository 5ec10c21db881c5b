"""Per-worker cache nodeid -> O_PATH fd.

The shared table says which nodeids are live; a cached fd is used only while its nodeid is
still live (the nodeid carries the slot generation, so a freed and reused slot never matches).
A miss reopens the inode from its file handle. Bounded LRU. A forgotten nodeid's fd must close
at once: while it is open the host keeps a deleted file, and on ext4 every such orphan slows
later creates. The supervisor, which serves FORGET, tells each worker the nodeids it freed
(`drop`); `sweep()` is the slow path that checks every cached nodeid against the table.

Inodes without a file handle (inode_file_handles: never, or a file system without handles
in single-worker mode) are *pinned*: their O_PATH fd is the only way back to them, so it is
kept outside the LRU until the guest forgets the nodeid.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict

from vfsd.fs.inode_table import ROOT_ID, InodeTable
from workers.passthrough.file_handle import MountFds, open_by_handle


class InodeCache:
    def __init__(
        self, table: InodeTable, mounts: MountFds, root_fd: int, capacity: int = 4096
    ) -> None:
        self._table = table
        self._mounts = mounts
        self.root_fd = root_fd
        self.capacity = max(16, capacity)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pinned: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._fds) + len(self._pinned)

    def fd(self, nodeid: int) -> int:
        """O_PATH fd of a live nodeid; ESTALE if the guest no longer holds it."""
        if nodeid == ROOT_ID:
            return self.root_fd
        fd = self._fds.get(nodeid)
        if fd is not None:
            if self._table.is_live(nodeid):
                self._fds.move_to_end(nodeid)
                return fd
            del self._fds[nodeid]
            os.close(fd)
            raise OSError(errno.ESTALE, "stale nodeid")
        fd = self._pinned.get(nodeid)
        if fd is not None:
            if self._table.is_live(nodeid):
                return fd
            del self._pinned[nodeid]
            os.close(fd)
            raise OSError(errno.ESTALE, "stale nodeid")
        entry = self._table.get(nodeid)
        if entry is None or not entry.handle.data:
            raise OSError(errno.ESTALE, "stale nodeid")
        fd = open_by_handle(self._mounts.get(entry.mnt_id), entry.handle, os.O_PATH)
        return self.insert(nodeid, fd)

    def insert(self, nodeid: int, fd: int, pinned: bool = False) -> int:
        """Cache `fd` (an O_PATH fd of that inode, ownership passes to the cache); returns the
        fd to use, which is the already cached one if there was one."""
        if nodeid == ROOT_ID:
            os.close(fd)
            return self.root_fd
        old = self._fds.get(nodeid)
        if old is None:
            old = self._pinned.get(nodeid)
        if old is not None:
            os.close(fd)
            if nodeid in self._fds:
                self._fds.move_to_end(nodeid)
            return old
        if pinned:
            self._pinned[nodeid] = fd
            return fd
        self._fds[nodeid] = fd
        while len(self._fds) > self.capacity:
            _, victim = self._fds.popitem(last=False)
            os.close(victim)
        return fd

    def drop(self, nodeids: list[int]) -> int:
        """Close the fds of freed nodeids (a freed nodeid never comes back: the slot's
        generation is in it); returns how many were cached."""
        closed = 0
        fds, pinned = self._fds, self._pinned
        for n in nodeids:
            fd = fds.pop(n, None)
            if fd is None:
                fd = pinned.pop(n, None)
                if fd is None:
                    continue
            os.close(fd)
            closed += 1
        return closed

    def sweep(self) -> int:
        """Close fds whose nodeid was forgotten; returns how many."""
        dead = [n for n in self._fds if not self._table.is_live(n)]
        for n in dead:
            os.close(self._fds.pop(n))
        pinned = [n for n in self._pinned if not self._table.is_live(n)]
        for n in pinned:
            os.close(self._pinned.pop(n))
        return len(dead) + len(pinned)

    def clear(self) -> None:
        fds, self._fds = self._fds, OrderedDict()
        pinned, self._pinned = self._pinned, {}
        for fd in (*fds.values(), *pinned.values()):
            os.close(fd)
