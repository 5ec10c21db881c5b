"""The contract between the FUSE server and a file system (virtiofsd's `FileSystem` trait).

Every op defaults to ENOSYS. Ops take Python values (never request bytes) and return small
results or raise OSError with the errno to send. Obligations (as in virtiofsd):
- lookup, mknod, mkdir, symlink, link, create and readdir_lookup each add 1 to the returned
  inode's lookup count (the shared inode table's `nlookup`); FORGET takes them back.
- Nodeids returned are never 0 (except "no entry") and never 1 unless it is the root itself.
- An fh is only meaningful to the worker that issued it.

Only the creating ops (and ACCESS) get the caller's `Context`; the hot ops take none.

Creating ops take `secctx`: the (xattr name, value) security context the guest's LSM gave
the new inode (FUSE_SECURITY_CTX), or None.

Blocking locks: `setlk(..., sleep=True)` may return a `Waiter` (workers/passthrough/locks.py)
instead of blocking; the server starts it, keeps the request, and after the waiter finished
calls `lock_done(waiter)` in the main thread before replying.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import NamedTuple

from vfsd.fuse.init import Session
from workers.passthrough.locks import Lock, Waiter


class Context(NamedTuple):
    uid: int
    gid: int
    pid: int


class Entry(NamedTuple):
    """A looked-up inode: its nodeid (generation is folded into it, so FUSE's is always 0)
    and `fuse_attr.flags` (FUSE_ATTR_SUBMOUNT)."""

    nodeid: int
    attr: os.stat_result
    flags: int = 0


SecCtx = tuple[bytes, bytes] | None


class Opened(NamedTuple):
    fh: int
    open_flags: int  # FOPEN_*


class SetAttr(NamedTuple):
    """Decoded fuse_setattr_in; fields not flagged in `valid` are meaningless."""

    valid: int
    fh: int
    size: int
    atime: int
    atimensec: int
    mtime: int
    mtimensec: int
    mode: int
    uid: int
    gid: int


#: (d_ino, cookie of the next entry, DT_* type, name)
DirEntry = tuple[int, int, int, bytes]


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, "not implemented")


class FileSystem:
    def start_session(self, session: Session) -> None:
        """A FUSE session began (INIT settled)."""

    def destroy(self) -> None:
        """The session ended: drop every handle and cached fd."""

    def forget(self, nodeid: int, nlookup: int) -> None:
        raise _enosys()

    def forgotten(self, nodeids: list[int]) -> int:
        """Another process freed these nodeids: drop what is cached for them; returns how
        many were."""
        return 0

    def lookup(self, parent: int, name: bytes) -> Entry:
        raise _enosys()

    def getattr(self, nodeid: int, fh: int | None) -> os.stat_result:
        raise _enosys()

    def setattr(self, nodeid: int, attr: SetAttr) -> os.stat_result:
        raise _enosys()

    def readlink(self, nodeid: int) -> bytes:
        raise _enosys()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes,
                secctx: SecCtx = None) -> Entry:
        raise _enosys()

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int,
        secctx: SecCtx = None,
    ) -> Entry:
        raise _enosys()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int,
              secctx: SecCtx = None) -> Entry:
        raise _enosys()

    def unlink(self, parent: int, name: bytes) -> None:
        raise _enosys()

    def rmdir(self, parent: int, name: bytes) -> None:
        raise _enosys()

    def rename(
        self, olddir: int, oldname: bytes, newdir: int, newname: bytes, flags: int
    ) -> None:
        raise _enosys()

    def link(self, nodeid: int, newparent: int, newname: bytes) -> Entry:
        raise _enosys()

    def open(self, nodeid: int, flags: int, kill_priv: bool = False) -> Opened:
        """`kill_priv`: FUSE_OPEN_KILL_SUIDGID (a truncating open by an unprivileged user)."""
        raise _enosys()

    def create(
        self, ctx: Context, parent: int, name: bytes, mode: int, flags: int, umask: int,
        kill_priv: bool = False, secctx: SecCtx = None,
    ) -> tuple[Entry, Opened]:
        raise _enosys()

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int,
        secctx: SecCtx = None,
    ) -> tuple[Entry, Opened]:
        """O_TMPFILE in directory `parent`: an unnamed file, linkable later with LINK."""
        raise _enosys()

    def read(self, nodeid: int, fh: int, offset: int, bufs: list[memoryview]) -> int:
        raise _enosys()

    def write(
        self, nodeid: int, fh: int, offset: int, bufs: list[memoryview], write_flags: int
    ) -> int:
        raise _enosys()

    def flush(self, nodeid: int, fh: int, lock_owner: int) -> None:
        raise _enosys()

    def release(self, nodeid: int, fh: int, flags: int, release_flags: int) -> None:
        raise _enosys()

    def fsync(self, nodeid: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    def statfs(self, nodeid: int) -> os.statvfs_result:
        raise _enosys()

    def opendir(self, nodeid: int, flags: int) -> Opened:
        raise _enosys()

    def readdir(self, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        raise _enosys()

    def readdir_lookup(self, nodeid: int, fh: int, name: bytes) -> Entry:
        """LOOKUP of one READDIRPLUS entry, relative to the open directory `fh`."""
        raise _enosys()

    def releasedir(self, nodeid: int, fh: int) -> None:
        raise _enosys()

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        raise _enosys()

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int,
                 xflags: int = 0) -> None:
        """`xflags`: fuse_setxattr_in.setxattr_flags (FUSE_SETXATTR_ACL_KILL_SGID)."""
        raise _enosys()

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        raise _enosys()

    def listxattr(self, nodeid: int) -> bytes:
        """All names, each NUL-terminated."""
        raise _enosys()

    def removexattr(self, nodeid: int, name: bytes) -> None:
        raise _enosys()

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        raise _enosys()

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        raise _enosys()

    def copy_file_range(
        self, fh_in: int, off_in: int, nodeid_out: int, fh_out: int, off_out: int,
        length: int, flags: int,
    ) -> int:
        raise _enosys()

    def syncfs(self, nodeid: int) -> None:
        raise _enosys()

    def getlk(self, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        """The first lock that would conflict with `lock`, or one of type F_UNLCK."""
        raise _enosys()

    def setlk(self, nodeid: int, fh: int, owner: int, lock: Lock, flock: bool, sleep: bool
              ) -> Waiter | None:
        """Take or release a lock; with `sleep`, a lock that is not free returns a Waiter
        (not started) instead of EAGAIN."""
        raise _enosys()

    def lock_done(self, waiter: Waiter, discard: bool = False) -> None:
        """Main-thread bookkeeping once a Waiter finished (its fd is ours to close);
        `discard`: nobody will be told the result (cancelled at session end)."""
        os.close(waiter.fd)
