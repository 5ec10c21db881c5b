"""The shared inode table: one entry per inode the guest holds a lookup reference on.

Created by the supervisor before it forks the workers (children inherit the mapping); the
supervisor's FORGET path and every worker's LOOKUP path mutate it concurrently.

Layout (one posix_ipc shared-memory segment, all fields u64, little-endian, sparse):

    header   8 x u64   magic, capacity, nbuckets, nstripes, free_head, next_unused, count, 0
    buckets  nbuckets x u64      slot index of the first entry of each hash chain (0 = empty)
    entries  (capacity + 1) x 24 x u64, slot 0 unused, slot 1 = the export root
        0 nodeid     (generation << 32 | slot), 0 while free; written LAST when publishing
        1 generation per slot, bumped on every reuse, so a reused slot never repeats a nodeid
        2 nlookup
        3 st_dev   4 st_ino   5 mnt_id        (the key: hard links share one entry)
        6 next       hash-chain link while live, free-list link while free
        7 handle_bytes | handle_type << 32
        8..23 file handle (MAX_HANDLE_SZ = 128 bytes)

Concurrency:
- Chains, nlookup and allocation change under OFD byte-range locks on a lock file (byte i =
  stripe i, byte nstripes = allocator). The kernel drops them when the holder dies, so a
  killed worker never wedges the others. Each process opens the lock file itself (an fd
  inherited across fork shares the open file description, hence the locks): this happens
  lazily on first use after a fork. By default the lock file is an anonymous memfd that
  children reopen through /proc/self/fd/N of the inherited fd (a reopen is a new
  description), so nothing is left behind on disk. Use one table object per thread.
- `get`/`is_live` are lock-free: writers fill an entry and publish its nodeid last; readers
  re-check the nodeid after reading the fields. Every field a lock-free reader sees is written
  with one aligned 64-bit store (element assignment on a 'Q' view), never `pack_into`, which
  zero-fills first (PROTOCOLS.md trap 23).
- A holder killed mid-update can leak a slot or skew `count()`; it cannot publish a
  half-written entry.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import weakref
from typing import NamedTuple

import posix_ipc

MAGIC = 0x544E4931_64736676  # b"vfsd1INT" little-endian
ROOT_ID = 1
ROOT_SLOT = 1
MAX_HANDLE_SZ = 128
DEFAULT_CAPACITY = 1 << 20
DEFAULT_STRIPES = 64

_HDR_Q = 8
H_MAGIC, H_CAPACITY, H_NBUCKETS, H_NSTRIPES, H_FREE, H_NEXT_UNUSED, H_COUNT = range(7)
_ENTRY_Q = 24
E_NODEID, E_GEN, E_NLOOKUP, E_DEV, E_INO, E_MNT, E_NEXT, E_HMETA, E_HANDLE = range(9)
_SLOT_MASK = 0xFFFFFFFF
MAX_CAPACITY = _SLOT_MASK - 1  # slot numbers are 32 bits of the nodeid
_GEN_MAX = 0xFFFFFFFF
_M64 = (1 << 64) - 1

# struct flock on x86-64/aarch64: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int)
_FLOCK = struct.Struct("hhxxxxqqixxxx")
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


class FileHandle(NamedTuple):
    """A `struct file_handle` from name_to_handle_at: type and opaque bytes (≤ 128)."""

    handle_type: int
    data: bytes


InodeKey = tuple[int, int, int]  # (st_dev, st_ino, mnt_id)


class Entry(NamedTuple):
    nodeid: int
    nlookup: int
    dev: int
    ino: int
    mnt_id: int
    handle: FileHandle

    @property
    def key(self) -> InodeKey:
        return (self.dev, self.ino, self.mnt_id)


_tables: weakref.WeakSet[InodeTable] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The inherited lock fd shares the parent's open file description (and its OFD locks):
    # drop it so the child opens its own on first use.
    for t in list(_tables):
        t._forget_lock_fd()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _hash(dev: int, ino: int, mnt: int) -> int:
    h = ((ino * 0x9E3779B97F4A7C15) ^ (dev * 0xBF58476D1CE4E5B9) ^ mnt) & _M64
    return h ^ (h >> 29)


class InodeTable:
    """Shared nodeid ↔ inode map. See the module docstring for layout and locking."""

    def __init__(
        self, mapping: mmap.mmap, lock_path: str | None, name: str | None, lock_origin: int = -1
    ) -> None:
        self._mm = mapping
        self._mv = memoryview(mapping)
        self._q = self._mv.cast("Q")
        q = self._q
        if q[H_MAGIC] != MAGIC:
            raise ValueError("not a vfsd inode table (bad magic)")
        self.capacity = q[H_CAPACITY]
        self._nbuckets = q[H_NBUCKETS]
        self._nstripes = q[H_NSTRIPES]
        self._bmask = self._nbuckets - 1
        self._smask = self._nstripes - 1
        self._bbase = _HDR_Q
        self._ebase = _HDR_Q + self._nbuckets
        self._alloc_lock = self._nstripes
        self._locks = [
            _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, i, 1, 0) for i in range(self._nstripes + 1)
        ]
        self._unlocks = [
            _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, i, 1, 0) for i in range(self._nstripes + 1)
        ]
        self.lock_path = lock_path
        self.name = name
        # The creator's memfd: inherited by children, which reopen it (never lock through it).
        self._lock_origin = lock_origin
        self._lock_fd = lock_origin
        self._lock_pid = os.getpid() if lock_origin >= 0 else 0
        _tables.add(self)

    # ---------------------------------------------------------------- construction
    @staticmethod
    def size_for(capacity: int, nbuckets: int) -> int:
        return 8 * (_HDR_Q + nbuckets + (capacity + 1) * _ENTRY_Q)

    @classmethod
    def create(
        cls,
        capacity: int = DEFAULT_CAPACITY,
        lock_path: str | None = None,
        *,
        name: str | None = None,
        unlink: bool = True,
        stripes: int = DEFAULT_STRIPES,
    ) -> InodeTable:
        """Create a table (supervisor, before forking). The shm name is unlinked once mapped
        unless `unlink=False` (then tools can `attach` by name). Without `lock_path` the
        lock file is an anonymous memfd (see the module docstring)."""
        if not 2 <= capacity <= MAX_CAPACITY:
            raise ValueError("capacity out of range")
        if stripes & (stripes - 1) or not 1 <= stripes <= 4096:
            raise ValueError("stripes must be a power of two in 1..4096")
        nbuckets = 1 << (capacity - 1).bit_length()
        name = name or f"/vfsd-{os.getpid()}-inodes"
        size = cls.size_for(capacity, nbuckets)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            mapping = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
            if unlink:
                shm.unlink()
        q = memoryview(mapping).cast("Q")
        q[H_CAPACITY] = capacity
        q[H_NBUCKETS] = nbuckets
        q[H_NSTRIPES] = stripes
        q[H_FREE] = 0
        q[H_NEXT_UNUSED] = ROOT_SLOT + 1
        q[H_COUNT] = 0
        q[H_MAGIC] = MAGIC
        q.release()
        if lock_path is None:
            origin = os.memfd_create("vfsd-inode-locks", os.MFD_CLOEXEC)
            return cls(mapping, None, None if unlink else name, origin)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return cls(mapping, lock_path, None if unlink else name)

    @classmethod
    def attach(cls, name: str, lock_path: str) -> InodeTable:
        """Map an existing (not unlinked) table by name, e.g. from a diagnostic tool. For a
        memfd lock file pass `/proc/<creator pid>/fd/<n>` as `lock_path`."""
        shm = posix_ipc.SharedMemory(name)
        try:
            mapping = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        return cls(mapping, lock_path, name)

    def close(self) -> None:
        self._forget_lock_fd()
        if self._lock_origin >= 0:
            os.close(self._lock_origin)
            self._lock_origin = -1
        _tables.discard(self)
        self._q.release()
        self._mv.release()
        self._mm.close()

    # ---------------------------------------------------------------- locks
    def open_locks(self) -> None:
        """Open this process's own description of the lock file (idempotent per process)."""
        if self._lock_fd >= 0 and self._lock_pid == os.getpid():
            return
        self._forget_lock_fd()
        path = self.lock_path or f"/proc/self/fd/{self._lock_origin}"
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._lock_pid = os.getpid()

    def _forget_lock_fd(self) -> None:
        # Drop this process's description (never the inherited memfd we reopen from).
        if self._lock_fd >= 0 and self._lock_fd != self._lock_origin:
            os.close(self._lock_fd)
        self._lock_fd = -1

    def _lock(self, idx: int) -> None:
        if self._lock_fd < 0:
            self.open_locks()
        fcntl.fcntl(self._lock_fd, _F_OFD_SETLKW, self._locks[idx])

    def _unlock(self, idx: int) -> None:
        fcntl.fcntl(self._lock_fd, _F_OFD_SETLK, self._unlocks[idx])

    def stripe_of(self, key: InodeKey) -> int:
        return _hash(*key) & self._bmask & self._smask

    # ---------------------------------------------------------------- readers (lock-free)
    def is_live(self, nodeid: int) -> bool:
        """True while `nodeid` names a live entry (one aligned load)."""
        slot = nodeid & _SLOT_MASK
        if not 0 < slot <= self.capacity:
            return False
        return self._q[self._ebase + slot * _ENTRY_Q] == nodeid

    def get(self, nodeid: int) -> Entry | None:
        """A consistent snapshot of a live entry, or None."""
        slot = nodeid & _SLOT_MASK
        if not 0 < slot <= self.capacity or nodeid >> 32 > _GEN_MAX:
            return None
        q = self._q
        e = self._ebase + slot * _ENTRY_Q
        if q[e] != nodeid:
            return None
        nlookup, dev, ino, mnt, meta = q[e + E_NLOOKUP], q[e + E_DEV], q[e + E_INO], \
            q[e + E_MNT], q[e + E_HMETA]
        n = meta & _SLOT_MASK
        if n > MAX_HANDLE_SZ:
            return None
        off = (e + E_HANDLE) * 8
        data = bytes(self._mv[off:off + n])
        if q[e] != nodeid:  # freed or reused while we read: the fields may be torn
            return None
        htype = meta >> 32
        if htype >= 1 << 31:
            htype -= 1 << 32
        return Entry(nodeid, nlookup, dev, ino, mnt, FileHandle(htype, data))

    def count(self) -> int:
        """Live entries, root included."""
        return self._q[H_COUNT]

    # ---------------------------------------------------------------- writers (locked)
    def _fill(self, e: int, key: InodeKey, handle: FileHandle, nlookup: int) -> None:
        q = self._q
        data = handle.data
        if len(data) > MAX_HANDLE_SZ:
            raise ValueError("file handle larger than MAX_HANDLE_SZ")
        q[e + E_NLOOKUP] = nlookup
        q[e + E_DEV], q[e + E_INO], q[e + E_MNT] = key
        q[e + E_HMETA] = len(data) | ((handle.handle_type & _SLOT_MASK) << 32)
        off = (e + E_HANDLE) * 8
        self._mv[off:off + len(data)] = data

    def _matches(self, e: int, dev: int, ino: int, mnt: int, handle: FileHandle) -> bool:
        q = self._q
        if q[e + E_INO] != ino or q[e + E_DEV] != dev or q[e + E_MNT] != mnt:
            return False
        data = handle.data
        if q[e + E_HMETA] != len(data) | ((handle.handle_type & _SLOT_MASK) << 32):
            return False
        off = (e + E_HANDLE) * 8
        return self._mv[off:off + len(data)] == data

    def set_root(self, key: InodeKey, handle: FileHandle) -> None:
        """Install the export root as nodeid 1; idempotent (every worker may call it)."""
        b = _hash(*key) & self._bmask
        stripe = b & self._smask
        q = self._q
        e = self._ebase + ROOT_SLOT * _ENTRY_Q
        self._lock(stripe)
        try:
            if q[e] == ROOT_ID:
                if not self._matches(e, *key, handle):
                    raise ValueError("inode table already has a different root")
                return
            self._fill(e, key, handle, 1)
            q[e + E_NEXT] = q[self._bbase + b]
            q[e] = ROOT_ID
            q[self._bbase + b] = ROOT_SLOT
        finally:
            self._unlock(stripe)
        self._lock(self._alloc_lock)
        q[H_COUNT] = q[H_COUNT] + 1
        self._unlock(self._alloc_lock)

    def ref(self, key: InodeKey, handle: FileHandle) -> int:
        """Find the entry for (key, handle) or create it; nlookup += 1; return its nodeid.

        The handle takes part in the match: a host inode number reused by a new file after
        the old one was deleted gets a fresh nodeid instead of the stale one.
        """
        if len(handle.data) > MAX_HANDLE_SZ:
            raise ValueError("file handle larger than MAX_HANDLE_SZ")
        dev, ino, mnt = key
        b = _hash(dev, ino, mnt) & self._bmask
        stripe = b & self._smask
        q = self._q
        ebase = self._ebase
        self._lock(stripe)
        try:
            slot = q[self._bbase + b]
            hops = 0
            while slot:
                e = ebase + slot * _ENTRY_Q
                if self._matches(e, dev, ino, mnt, handle):
                    q[e + E_NLOOKUP] = q[e + E_NLOOKUP] + 1
                    return q[e]
                slot = q[e + E_NEXT]
                hops += 1
                if hops > self.capacity:
                    raise OSError(errno.EIO, "inode table hash chain corrupt")
            slot = self._alloc()
            e = ebase + slot * _ENTRY_Q
            gen = q[e + E_GEN] + 1
            if gen > _GEN_MAX:
                gen = 1
            q[e + E_GEN] = gen
            self._fill(e, key, handle, 1)
            q[e + E_NEXT] = q[self._bbase + b]
            nodeid = gen << 32 | slot
            q[e] = nodeid  # publish
            q[self._bbase + b] = slot
            return nodeid
        finally:
            self._unlock(stripe)

    def forget(self, nodeid: int, nlookup: int) -> bool:
        """nlookup -= n; free the entry at zero; True if this call freed it. Unknown/stale
        nodeids and the root are ignored (FORGET has no reply to carry an error)."""
        if nodeid == ROOT_ID or nlookup <= 0:
            return False
        slot = nodeid & _SLOT_MASK
        if not ROOT_SLOT < slot <= self.capacity:
            return False
        q = self._q
        e = self._ebase + slot * _ENTRY_Q
        if q[e] != nodeid:
            return False
        dev, ino, mnt = q[e + E_DEV], q[e + E_INO], q[e + E_MNT]
        b = _hash(dev, ino, mnt) & self._bmask
        stripe = b & self._smask
        self._lock(stripe)
        try:
            if q[e] != nodeid:  # freed (and maybe reused) before we got the lock
                return False
            left = q[e + E_NLOOKUP] - nlookup
            if left > 0:
                q[e + E_NLOOKUP] = left
                return False
            head = self._bbase + b
            cur, prev_link, hops = q[head], head, 0
            while cur and cur != slot and hops <= self.capacity:
                prev_link = self._ebase + cur * _ENTRY_Q + E_NEXT
                cur = q[prev_link]
                hops += 1
            if cur == slot:
                q[prev_link] = q[e + E_NEXT]
            q[e] = 0
            q[e + E_NLOOKUP] = 0
            self._free(slot)
            return True
        finally:
            self._unlock(stripe)

    def _alloc(self) -> int:
        q = self._q
        self._lock(self._alloc_lock)
        try:
            slot = q[H_FREE]
            if slot:
                q[H_FREE] = q[self._ebase + slot * _ENTRY_Q + E_NEXT]
            else:
                slot = q[H_NEXT_UNUSED]
                if slot > self.capacity:
                    raise OSError(errno.ENFILE, "inode table full")
                q[H_NEXT_UNUSED] = slot + 1
            q[H_COUNT] = q[H_COUNT] + 1
            return slot
        finally:
            self._unlock(self._alloc_lock)

    def _free(self, slot: int) -> None:
        q = self._q
        self._lock(self._alloc_lock)
        try:
            q[self._ebase + slot * _ENTRY_Q + E_NEXT] = q[H_FREE]
            q[H_FREE] = slot
            q[H_COUNT] = q[H_COUNT] - 1
        finally:
            self._unlock(self._alloc_lock)

    def clear(self) -> None:
        """Drop every entry but the root (DESTROY / new INIT). Callers quiesce workers first;
        slot generations survive, so no old nodeid ever comes back."""
        q = self._q
        for i in range(self._nstripes + 1):
            self._lock(i)
        try:
            top = q[H_NEXT_UNUSED]
            ebase = self._ebase
            for slot in range(ROOT_SLOT + 1, top):
                q[ebase + slot * _ENTRY_Q] = 0
            nb = self._nbuckets
            boff = self._bbase * 8
            self._mv[boff:boff + nb * 8] = bytes(nb * 8)
            root = ebase + ROOT_SLOT * _ENTRY_Q
            live_root = q[root] == ROOT_ID
            if live_root:
                b = _hash(q[root + E_DEV], q[root + E_INO], q[root + E_MNT]) & self._bmask
                q[root + E_NEXT] = 0
                q[self._bbase + b] = ROOT_SLOT
            q[H_FREE] = 0
            q[H_NEXT_UNUSED] = ROOT_SLOT + 1
            q[H_COUNT] = 1 if live_root else 0
        finally:
            for i in reversed(range(self._nstripes + 1)):
                self._unlock(i)
