"""Syscalls the `os` module lacks, via ctypes on the already-loaded libc.

Each wrapper raises OSError(errno) like `os` does.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYS_PIDFD_GETFD = 438  # x86-64 and aarch64
_getdents64 = _libc.getdents64
_getdents64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_getdents64.restype = ctypes.c_ssize_t


def utimens_fd(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(fd, "", {atime, mtime}, AT_EMPTY_PATH): works on O_PATH fds, never follows
    a symlink; nsec may be UTIME_NOW / UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_utimensat(fd, b"", times, AT_EMPTY_PATH))


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", uid, gid, AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW); -1 keeps a field."""
    _check(_fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                     AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    _check(_renameat2(olddirfd, old, newdirfd, new, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_fallocate(fd, mode, offset, length))


def syncfs(fd: int) -> None:
    _check(_syncfs(fd))


def getdents64(fd: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    """Fill `buf` with linux_dirent64 records from the fd's position; bytes used (0 = end)."""
    return _check(_getdents64(fd, buf, len(buf)))


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A duplicate (same open file description) of fd `fd` of the process behind `pidfd`.
    A dead process raises ProcessLookupError (ESRCH)."""
    return int(_check(_syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)))
