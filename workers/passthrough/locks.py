"""POSIX (fcntl) and BSD (flock) locks of the guest, held on the host.

POSIX locks belong to a *lock owner* (the guest process's files_struct, or the guest file
for its own OFD locks) per inode, whatever fd was used. On the host each (inode, owner) gets
one open file description (OFD) of the file, and the guest's locks become OFD locks on it,
so they conflict with each other and with host processes exactly as on the host.

Several workers must use the *same* OFD for one owner (a process may open a file twice and
the two opens may land on different workers). A small registry in shared memory, created at
import (that is, in the supervisor, before any worker is forked), maps (st_dev, st_ino,
owner) to the worker pid and fd number holding that OFD; another worker borrows it for one
operation with pidfd_getfd(2), which duplicates the fd, description included.

Life of an OFD: created by the first SETLK/SETLKW of (inode, owner); every lock of that
owner goes through it; FLUSH (the guest closed a file) unlocks everything and unregisters
it, as POSIX drops all of a process's locks on any close; the holder closes it when the
fh it was created through is released (guest OFD-style owners never FLUSH).

flock locks belong to the guest file, that is to our fh: they are taken on the fh's own fd.

SETLKW never blocks the worker: when the lock is not free at once, a `Waiter` thread does
the blocking call on a dup of the OFD (the lock still lands on the right description) and
reports through a callback; the server sends the reply from the worker's main thread.
A waiter is cancelled with a signal to its thread (its fcntl/flock returns EINTR);
cancelling waits until the thread has returned, so it never outlives its request.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import signal
import struct
import threading
from collections.abc import Callable
from typing import NamedTuple

from workers.passthrough.syscalls import pidfd_getfd

log = logging.getLogger("vfsd.worker.locks")

F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
OFFSET_MAX = (1 << 63) - 1
#: struct flock (x86-64/aarch64): l_type, l_whence (short), l_start, l_len (off_t), l_pid
FLOCK = struct.Struct("hhxxxxqqixxxx")
#: Signal that interrupts a waiter thread's blocking call (a real-time signal nobody else
#: in vfsd uses; its Python handler does nothing).
CANCEL_SIGNAL = signal.SIGRTMIN + 6

_libc = ctypes.CDLL(None, use_errno=True)
_fcntl = _libc.fcntl
_fcntl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_flock = _libc.flock
_flock.argtypes = [ctypes.c_int, ctypes.c_int]


class Lock(NamedTuple):
    """A fuse_file_lock: inclusive byte range [start, end] (end = OFFSET_MAX: to EOF)."""

    start: int
    end: int
    type: int
    pid: int


def to_flock(lk: Lock, typ: int | None = None) -> bytes:
    length = 0 if lk.end >= OFFSET_MAX else lk.end - lk.start + 1
    return FLOCK.pack(lk.type if typ is None else typ, os.SEEK_SET, lk.start, length, 0)


def from_flock(raw: bytes, pid: int = 0) -> Lock:
    typ, _whence, start, length, _pid = FLOCK.unpack(raw)
    end = OFFSET_MAX if length == 0 else start + length - 1
    return Lock(start, end, typ, pid)


def check_lock(lk: Lock) -> None:
    if lk.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
        raise OSError(errno.EINVAL, "bad lock type")
    if lk.start > OFFSET_MAX or lk.end > OFFSET_MAX or lk.end < lk.start:
        raise OSError(errno.EINVAL, "bad lock range")


# ------------------------------------------------------------------------------ registry
_SLOTS = 4096
_WORDS = 6  # dev, ino, owner, holder pid (0 empty, 1 deleted), holder fd, guest pid
_EMPTY, _DELETED = 0, 1
_M64 = (1 << 64) - 1


class Registry:
    """(st_dev, st_ino, owner) -> (worker pid, fd) in shared memory, one OFD-locked section.

    Created before fork; each process opens its own description of the lock memfd (an
    inherited fd would share the parent's description, and with it the lock)."""

    def __init__(self, slots: int = _SLOTS) -> None:
        self.slots = slots
        self._mm = mmap.mmap(-1, 8 * (1 + slots * _WORDS))  # MAP_SHARED | MAP_ANONYMOUS
        self._q = memoryview(self._mm).cast("Q")
        self._origin = os.memfd_create("vfsd-lock-registry", os.MFD_CLOEXEC)
        os.ftruncate(self._origin, 1)
        self._fd = -1
        self._pid = 0
        self._lock_req = FLOCK.pack(F_WRLCK, os.SEEK_SET, 0, 1, 0)
        self._unlock_req = FLOCK.pack(F_UNLCK, os.SEEK_SET, 0, 1, 0)

    def _lock(self) -> None:
        if self._pid != os.getpid():
            self._fd = os.open(f"/proc/self/fd/{self._origin}", os.O_RDWR | os.O_CLOEXEC)
            self._pid = os.getpid()
        fcntl.fcntl(self._fd, F_OFD_SETLKW, self._lock_req)

    def _unlock(self) -> None:
        fcntl.fcntl(self._fd, F_OFD_SETLK, self._unlock_req)

    @property
    def count(self) -> int:
        return self._q[0]

    def _probe(self, dev: int, ino: int, owner: int) -> tuple[int, int]:
        """(slot of the key or -1, first free slot or -1)."""
        q = self._q
        h = ((ino * 0x9E3779B97F4A7C15) ^ (dev * 0xBF58476D1CE4E5B9) ^ owner) & _M64
        i = (h ^ (h >> 31)) % self.slots
        free = -1
        for _ in range(self.slots):
            b = 1 + i * _WORDS
            holder = q[b + 3]
            if holder == _EMPTY:
                return -1, free if free >= 0 else i
            if holder == _DELETED:
                if free < 0:
                    free = i
            elif q[b] == dev and q[b + 1] == ino and q[b + 2] == owner:
                return i, free
            i = (i + 1) % self.slots
        return -1, free

    def find(self, dev: int, ino: int, owner: int) -> tuple[int, int] | None:
        self._lock()
        try:
            slot, _ = self._probe(dev, ino, owner & _M64)
            if slot < 0:
                return None
            b = 1 + slot * _WORDS
            return self._q[b + 3], self._q[b + 4]
        finally:
            self._unlock()

    def claim(self, dev: int, ino: int, owner: int, fd: int, guest_pid: int,
              replace: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """Register (our pid, fd) for the key unless someone holds it: returns the current
        holder then (None = registered). `replace` = a holder known dead to overwrite."""
        owner &= _M64
        self._lock()
        try:
            q = self._q
            slot, free = self._probe(dev, ino, owner)
            if slot >= 0:
                b = 1 + slot * _WORDS
                holder = (q[b + 3], q[b + 4])
                if holder != replace:
                    return holder
            elif free < 0:
                raise OSError(errno.ENOLCK, "lock registry full")
            else:
                slot = free
                b = 1 + slot * _WORDS
                q[0] += 1
            q[b], q[b + 1], q[b + 2] = dev, ino, owner
            q[b + 4], q[b + 5] = fd, guest_pid & 0xFFFFFFFF
            q[b + 3] = os.getpid()
            return None
        finally:
            self._unlock()

    def set_guest_pid(self, dev: int, ino: int, owner: int, guest_pid: int) -> None:
        self._lock()
        try:
            slot, _ = self._probe(dev, ino, owner & _M64)
            if slot >= 0:
                self._q[1 + slot * _WORDS + 5] = guest_pid & 0xFFFFFFFF
        finally:
            self._unlock()

    def remove(self, dev: int, ino: int, owner: int, holder: tuple[int, int] | None = None
               ) -> None:
        """Drop the key (only if still held by `holder`, when given)."""
        self._lock()
        try:
            slot, _ = self._probe(dev, ino, owner & _M64)
            if slot >= 0:
                b = 1 + slot * _WORDS
                if holder is None or (self._q[b + 3], self._q[b + 4]) == holder:
                    self._q[b + 3] = _DELETED
                    self._q[0] -= 1
        finally:
            self._unlock()

    def owners_of(self, dev: int, ino: int) -> list[tuple[int, int, int, int]]:
        """(owner, holder pid, holder fd, guest pid) of every OFD registered on an inode."""
        self._lock()
        try:
            q = self._q
            out = []
            for i in range(self.slots):
                b = 1 + i * _WORDS
                if q[b + 3] > _DELETED and q[b] == dev and q[b + 1] == ino:
                    out.append((q[b + 2], q[b + 3], q[b + 4], q[b + 5]))
            return out
        finally:
            self._unlock()


REGISTRY = Registry()


def borrow_fd(pid: int, fd: int) -> int:
    """A duplicate (same open file description) of fd `fd` of process `pid`."""
    if pid == os.getpid():
        return os.dup(fd)
    pidfd = os.pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)


# ------------------------------------------------------------------------------ waiters
_handler_installed = False


def _install_cancel_handler() -> None:
    """A Python handler (no SA_RESTART) so the signal only interrupts the waiter's call."""
    global _handler_installed
    if not _handler_installed and threading.current_thread() is threading.main_thread():
        signal.signal(CANCEL_SIGNAL, lambda *_: None)
        _handler_installed = True


class Waiter:
    """One blocking lock request (SETLKW) served by a helper thread.

    `fd` is owned by the waiter (a dup of the OFD or of the fh's fd); `done(waiter)` runs
    in the helper thread when the call returns: `error` is then 0 (lock taken) or an errno.
    """

    def __init__(self, fd: int, flock_op: int | None, request: bytes | None,
                 key: tuple[int, int, int] | None, fh: int, guest_pid: int) -> None:
        self.fd = fd
        self.flock_op = flock_op  # LOCK_SH / LOCK_EX for flock, None for POSIX
        self.request = request  # struct flock for POSIX
        self.key = key  # (dev, ino, owner) for POSIX
        self.fh = fh
        self.guest_pid = guest_pid
        self.error = -1
        self.cancelled = 0  # errno to answer with once cancelled
        self.finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: Callable[[Waiter], None] | None = None

    def start(self, done: Callable[[Waiter], None]) -> None:
        _install_cancel_handler()
        self._done = done
        self._thread = threading.Thread(target=self._run, name="vfsd-setlkw", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = ctypes.create_string_buffer(self.request) if self.request is not None else None
        while True:
            if self.cancelled:
                self.error = self.cancelled
                break
            if buf is not None:
                ret = _fcntl(self.fd, F_OFD_SETLKW, ctypes.cast(buf, ctypes.c_void_p))
            else:
                ret = _flock(self.fd, self.flock_op or 0)
            if ret == 0:
                self.error = 0
                break
            err = ctypes.get_errno()
            if err != errno.EINTR:
                self.error = err
                break
        self.finished.set()
        assert self._done is not None
        self._done(self)

    def cancel(self, err: int) -> None:
        """Make the waiter give up with `err` (it may still win the lock: then error 0).
        Waits (briefly) until its thread returned: a signal sent just before the thread
        enters its blocking call is lost, so it is sent again until it lands."""
        if not self.cancelled:
            self.cancelled = err
        thread = self._thread
        if thread is None or thread.ident is None:
            return
        for _ in range(200):
            if self.finished.is_set():
                return
            try:
                signal.pthread_kill(thread.ident, CANCEL_SIGNAL)
            except (ProcessLookupError, OSError):
                return
            self.finished.wait(0.002)
        log.warning("a lock waiter did not stop after 200 cancel signals")


# ------------------------------------------------------------------------------ per worker
_FLOCK_OPS = {F_RDLCK: fcntl.LOCK_SH, F_WRLCK: fcntl.LOCK_EX, F_UNLCK: fcntl.LOCK_UN}
_UNLOCK_ALL = FLOCK.pack(F_UNLCK, os.SEEK_SET, 0, 0, 0)
Key = tuple[int, int, int]  # (st_dev, st_ino, owner)


class LockTable:
    """The lock state of one worker: the OFDs it holds for (inode, owner) pairs.

    `inode_key(nodeid)` gives (st_dev, st_ino); `open_ofd(nodeid)` opens a new description
    of a regular file; `fh_fd(fh)` is the fd of one of our open handles (EBADF otherwise).
    """

    def __init__(self, inode_key: Callable[[int], tuple[int, int]],
                 open_ofd: Callable[[int], int], fh_fd: Callable[[int], int],
                 registry: Registry = REGISTRY) -> None:
        self._inode_key = inode_key
        self._open_ofd = open_ofd
        self._fh_fd = fh_fd
        self._reg = registry
        self._local: dict[Key, tuple[int, int]] = {}  # key -> (fd, fh it was created for)
        self._by_fh: dict[int, set[Key]] = {}

    def __len__(self) -> int:
        return len(self._local)

    # -------------------------------------------------------------- finding the OFD
    def _drop_local(self, key: Key) -> None:
        entry = self._local.pop(key, None)
        if entry is not None:
            fd, fh = entry
            keys = self._by_fh.get(fh)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_fh[fh]
            os.close(fd)

    def _borrow(self, key: Key, holder: tuple[int, int]) -> int | None:
        pid, fd = holder
        try:
            dup = borrow_fd(pid, fd)
        except OSError:
            return None  # holder gone (a killed worker): its locks died with it
        st = os.fstat(dup)
        if (st.st_dev, st.st_ino) != key[:2]:
            os.close(dup)
            return None
        return dup

    def _ofd(self, nodeid: int, owner: int, fh: int, guest_pid: int, create: bool
             ) -> tuple[int, bool, Key] | None:
        """(fd, borrowed, key) of the owner's OFD on the inode; a borrowed fd is the
        caller's to close. None if there is none and `create` is false."""
        dev, ino = self._inode_key(nodeid)
        key = (dev, ino, owner)
        me = os.getpid()
        for _ in range(3):
            holder = self._reg.find(dev, ino, owner)
            if holder is not None:
                local = self._local.get(key)
                if holder[0] == me and local is not None and local[0] == holder[1]:
                    return local[0], False, key
                dup = self._borrow(key, holder)
                if dup is not None:
                    if local is not None:
                        self._drop_local(key)  # an orphan from before a FLUSH
                    return dup, True, key
            if key in self._local:
                self._drop_local(key)
            if not create:
                return None
            fd = self._open_ofd(nodeid)
            try:
                other = self._reg.claim(dev, ino, owner, fd, guest_pid, replace=holder)
            except OSError:
                log.warning("lock registry full: locks of this owner stay in worker %d", me)
                other = None
            if other is None:
                self._local[key] = (fd, fh)
                self._by_fh.setdefault(fh, set()).add(key)
                return fd, False, key
            os.close(fd)  # another worker registered one meanwhile: use theirs
        raise OSError(errno.ENOLCK, "lock owner registry keeps changing")

    # -------------------------------------------------------------- ops
    def getlk(self, nodeid: int, owner: int, lk: Lock) -> Lock:
        check_lock(lk)
        if lk.type == F_UNLCK:
            raise OSError(errno.EINVAL, "GETLK of F_UNLCK")
        found = self._ofd(nodeid, owner, 0, lk.pid, create=False)
        if found is None:
            fd, borrowed, key = self._open_ofd(nodeid), True, None
        else:
            fd, borrowed, key = found
        try:
            conflict = from_flock(fcntl.fcntl(fd, F_OFD_GETLK, to_flock(lk)))
        finally:
            if borrowed:
                os.close(fd)
        if conflict.type == F_UNLCK:
            return Lock(lk.start, lk.end, F_UNLCK, 0)
        dev, ino = key[:2] if key is not None else self._inode_key(nodeid)
        return conflict._replace(pid=self._holder_pid(dev, ino, owner, conflict))

    def _holder_pid(self, dev: int, ino: int, owner: int, conflict: Lock) -> int:
        """Guest pid of the owner holding `conflict` (OFD locks carry none): the only other
        registered owner of the inode, or the one from whose OFD the conflict vanishes."""
        others = [o for o in self._reg.owners_of(dev, ino) if o[0] != owner & _M64]
        if len(others) == 1:
            return others[0][3]
        probe = to_flock(conflict, F_WRLCK)
        for other, pid, fd, guest_pid in others:
            dup = self._borrow((dev, ino, other), (pid, fd))
            if dup is None:
                continue
            try:
                seen = from_flock(fcntl.fcntl(dup, F_OFD_GETLK, probe))
            except OSError:
                continue
            finally:
                os.close(dup)
            if seen[:3] != conflict[:3]:
                return guest_pid
        return 0

    def setlk(self, nodeid: int, fh: int, owner: int, lk: Lock, flock: bool, sleep: bool
              ) -> Waiter | None:
        check_lock(lk)
        if flock:
            return self._flock(fh, lk, sleep)
        if lk.type == F_UNLCK:
            found = self._ofd(nodeid, owner, fh, lk.pid, create=False)
            if found is not None:
                fd, borrowed, _ = found
                try:
                    fcntl.fcntl(fd, F_OFD_SETLK, to_flock(lk))
                finally:
                    if borrowed:
                        os.close(fd)
            return None
        fd, borrowed, key = self._ofd(nodeid, owner, fh, lk.pid, create=True)  # type: ignore[misc]
        request = to_flock(lk)
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, request)
            return None
        except OSError as e:
            if not sleep or e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            wfd = fd if borrowed else os.dup(fd)
            borrowed = False  # the waiter owns it now
            return Waiter(wfd, None, request, key, fh, lk.pid)
        finally:
            if borrowed:
                os.close(fd)

    def _flock(self, fh: int, lk: Lock, sleep: bool) -> Waiter | None:
        fd = self._fh_fd(fh)
        op = _FLOCK_OPS[lk.type]
        if op == fcntl.LOCK_UN:
            fcntl.flock(fd, op)
            return None
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            if not sleep:
                raise
            return Waiter(os.dup(fd), op, None, None, fh, lk.pid)

    def waiter_done(self, w: Waiter, discard: bool = False) -> None:
        """A waiter finished: keep its OFD if that owner's registered one vanished meanwhile
        (a FLUSH raced with the grant), else close its duplicate."""
        if w.key is not None and w.error == 0 and not discard:
            dev, ino, owner = w.key
            if self._reg.find(dev, ino, owner) is None:
                try:
                    if self._reg.claim(dev, ino, owner, w.fd, w.guest_pid) is None:
                        self._drop_local(w.key)
                        self._local[w.key] = (w.fd, w.fh)
                        self._by_fh.setdefault(w.fh, set()).add(w.key)
                        return
                except OSError:
                    pass
        os.close(w.fd)

    def flush(self, nodeid: int, owner: int) -> None:
        """The owner closed a file of this inode: all its POSIX locks on it go (POSIX)."""
        if not self._reg.count and not self._local:
            return
        found = self._ofd(nodeid, owner, 0, 0, create=False)
        if found is None:
            return
        fd, borrowed, key = found
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, _UNLOCK_ALL)
        finally:
            holder = (os.getpid(), fd) if not borrowed else None
            self._reg.remove(*key, holder=holder)
            if borrowed:
                os.close(fd)
            else:
                self._drop_local(key)

    def release(self, fh: int) -> None:
        """The fh is closed: OFDs created through it go (owners that never FLUSH: guest OFD
        locks; POSIX owners already lost their locks at their FLUSH)."""
        keys = self._by_fh.pop(fh, None)
        if not keys:
            return
        me = os.getpid()
        for key in keys:
            entry = self._local.get(key)
            if entry is not None and entry[1] == fh:
                del self._local[key]
                self._reg.remove(*key, holder=(me, entry[0]))
                os.close(entry[0])

    def close_all(self) -> None:
        me = os.getpid()
        for key, (fd, _fh) in list(self._local.items()):
            self._reg.remove(*key, holder=(me, fd))
            os.close(fd)
        self._local.clear()
        self._by_fh.clear()
