"""File handles (name_to_handle_at / open_by_handle_at) and the mount fds that decode them.

Any worker can reopen any inode of the shared table from its handle; this needs
CAP_DAC_READ_SEARCH (we run as root) and a file system with export operations.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct

from vfsd.fs.inode_table import MAX_HANDLE_SZ, FileHandle
from workers.passthrough.syscalls import AT_EMPTY_PATH

log = logging.getLogger("vfsd.worker.fh")

_libc = ctypes.CDLL(None, use_errno=True)
# Pointers are passed as plain integer addresses (c_void_p): no ctypes objects per call.
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
]
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]

# struct file_handle { unsigned int handle_bytes; int handle_type; unsigned char f_handle[]; }
_FH_HEAD = struct.Struct("=Ii")
_HEAD = _FH_HEAD.size
# One scratch buffer per process (workers are single-threaded): the file_handle, then the
# int mount id name_to_handle_at writes; one unpack reads handle_bytes, handle_type, mnt_id.
_MNT_OFF = _HEAD + MAX_HANDLE_SZ
_OUT = struct.Struct(f"=Ii{MAX_HANDLE_SZ}xi")
_buf = ctypes.create_string_buffer(_OUT.size)
_addr = ctypes.addressof(_buf)
_view = memoryview(_buf).cast("B")
_ASK = _FH_HEAD.pack(MAX_HANDLE_SZ, 0)  # handle_bytes in: the room we have
#: FileHandle(type, data) without NamedTuple's Python-level __new__ (0.3 µs a call).
_new_tuple = tuple.__new__


class NoHandleSupport(OSError):
    """The file system cannot produce file handles (no export operations)."""


def _n2h_error() -> OSError:
    err = ctypes.get_errno()
    if err == errno.EOPNOTSUPP:
        return NoHandleSupport(err, "file system does not support file handles")
    return OSError(err, os.strerror(err))


def handle_of_fd(fd: int, *, _view=_view, _ask=_ASK, _call=_name_to_handle_at, _at=_addr,
                 _mnt_at=_addr + _MNT_OFF, _unpack=_OUT.unpack_from) -> tuple[FileHandle, int]:
    """(handle, mnt_id) of the inode `fd` refers to (O_PATH fds welcome, never follows).
    (Hot path of LOOKUP and CREATE: the keyword defaults are bound once, as locals.)"""
    _view[:_HEAD] = _ask
    if _call(fd, b"", _at, _mnt_at, AT_EMPTY_PATH) < 0:
        raise _n2h_error()
    nbytes, htype, mnt_id = _unpack(_view)
    return _new_tuple(FileHandle, (htype, _view[_HEAD:_HEAD + nbytes].tobytes())), mnt_id


def open_by_handle(mount_fd: int, handle: FileHandle, flags: int) -> int:
    data = handle.data
    n = len(data)
    if n > MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "file handle too large")
    view = _view
    _FH_HEAD.pack_into(view, 0, n, handle.handle_type)
    view[_HEAD:_HEAD + n] = data
    fd = _open_by_handle_at(mount_fd, _addr, flags | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mount_point(mnt_id: int) -> str | None:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ", 5)
            if len(fields) > 4 and fields[0] == str(mnt_id):
                return _unescape(fields[4])
    return None


class MountFds:
    """mnt_id -> an fd on that mount, for open_by_handle_at (which rejects O_PATH fds)."""

    def __init__(self, proc_self_fd: int) -> None:
        self._fds: dict[int, int] = {}
        self._proc = proc_self_fd

    def add(self, mnt_id: int, fd: int) -> None:
        self._fds.setdefault(mnt_id, fd)

    def get(self, mnt_id: int) -> int:
        fd = self._fds.get(mnt_id)
        if fd is None:
            fd = self._open(mnt_id)
            self._fds[mnt_id] = fd
        return fd

    def _open(self, mnt_id: int) -> int:
        path = _mount_point(mnt_id)
        if path is None:
            raise OSError(errno.ESTALE, f"mount {mnt_id} is gone")
        opath = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _, got = handle_of_fd(opath)
            if got != mnt_id:  # shadowed by a later mount on the same path
                raise OSError(errno.ESTALE, f"mount {mnt_id} not reachable at {path}")
            mode = os.fstat(opath).st_mode
            if stat.S_ISDIR(mode):
                return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=opath)
            if stat.S_ISREG(mode):
                return os.open(str(opath), os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._proc)
            raise OSError(errno.ESTALE, f"mount {mnt_id} root is neither file nor directory")
        finally:
            os.close(opath)

    def close(self) -> None:
        for fd in set(self._fds.values()):
            os.close(fd)
        self._fds.clear()


def export_has_handles(path: str) -> bool:
    """True if the directory's file system can encode file handles (False if it cannot, or
    the path cannot be opened: the start-up check reports that)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        handle_of_fd(fd)
    except NoHandleSupport:
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
    return True
