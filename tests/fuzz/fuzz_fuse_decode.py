"""FUSE request decoding and reply encoding, every opcode: `FuseServer.handle` (the workers'
entry point, where decoding lives) over a file system that only checks the decoded values
and answers with canned results, so nothing but the server's own code runs.

Input: see fuse_input.py. Documented outcomes: an error reply (the server turns OSError
into `-errno`) or no reply where FUSE has none. A crash is an exception the server's
catch-all had to log (`log.exception` in `handle`), a decoded value of the wrong type or
range reaching the file system, or a malformed answer (fuse_input.check_answer).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from tests.fuzz import fuse_input
from tests.fuzz.harness import Broken
from vfsd.fuse.options import FsOptions
from workers.passthrough.filesystem import Context, Entry, FileSystem, Opened, SetAttr
from workers.passthrough.locks import Lock
from workers.server import FuseServer

MAX_LEN = 4096
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_ROOT_STAT = os.stat("/")
_STATVFS = os.statvfs("/")


def _u(value: Any, top: int, what: str) -> None:
    if type(value) is not int or not 0 <= value <= top:
        raise Broken(f"{what} decoded as {value!r}")


def _name(value: Any, what: str = "name") -> None:
    if type(value) is not bytes or b"\0" in value:
        raise Broken(f"{what} decoded as {value!r}")


def _ctx(ctx: Any) -> None:
    if not isinstance(ctx, Context):
        raise Broken(f"context {ctx!r}")
    for field in ctx:
        _u(field, _U32, "context id")


def _secctx(secctx: Any) -> None:
    if secctx is not None:
        name, value = secctx
        _name(name, "security context name")
        if type(value) is not bytes:
            raise Broken(f"security context value {value!r}")


def _bufs(bufs: Any, size: int | None = None) -> int:
    if not isinstance(bufs, list) or not all(isinstance(b, memoryview) for b in bufs):
        raise Broken(f"buffers {bufs!r}")
    total = sum(map(len, bufs))
    if size is not None and total != size:
        raise Broken(f"{total} bytes of buffers for a {size}-byte request")
    return total


def _entry(nodeid: int = 2) -> Entry:
    return Entry(nodeid, _ROOT_STAT)


class CheckingFs(FileSystem):
    """Every op checks what the server decoded and answers a canned result."""

    idmapped = False

    def forget(self, nodeid: int, nlookup: int) -> None:
        _u(nodeid, _U64, "nodeid")
        _u(nlookup, _U64, "nlookup")

    def lookup(self, parent: int, name: bytes) -> Entry:
        _u(parent, _U64, "parent")
        _name(name)
        if name == b"missing":
            raise FileNotFoundError(2, "no such entry")
        return _entry()

    def getattr(self, nodeid: int, fh: int | None) -> os.stat_result:
        _u(nodeid, _U64, "nodeid")
        if fh is not None:
            _u(fh, _U64, "fh")
        return _ROOT_STAT

    def setattr(self, nodeid: int, attr: SetAttr) -> os.stat_result:
        if not isinstance(attr, SetAttr):
            raise Broken(f"setattr {attr!r}")
        for field in (attr.valid, attr.atimensec, attr.mtimensec, attr.mode, attr.uid,
                      attr.gid):
            _u(field, _U32, "setattr field")
        _u(attr.fh, _U64, "fh")
        _u(attr.size, _U64, "size")
        return _ROOT_STAT

    def readlink(self, nodeid: int) -> bytes:
        return b"target"

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes,
                secctx: Any = None) -> Entry:
        _ctx(ctx)
        _name(name)
        _name(target, "target")
        _secctx(secctx)
        return _entry()

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int,
              secctx: Any = None) -> Entry:
        _ctx(ctx)
        _name(name)
        for field in (mode, rdev, umask):
            _u(field, _U32, "mknod field")
        _secctx(secctx)
        return _entry()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int,
              secctx: Any = None) -> Entry:
        _ctx(ctx)
        _name(name)
        _u(mode, _U32, "mode")
        _u(umask, _U32, "umask")
        _secctx(secctx)
        return _entry()

    def unlink(self, parent: int, name: bytes) -> None:
        _name(name)

    def rmdir(self, parent: int, name: bytes) -> None:
        _name(name)

    def rename(self, olddir: int, oldname: bytes, newdir: int, newname: bytes,
               flags: int) -> None:
        _u(newdir, _U64, "newdir")
        _name(oldname)
        _name(newname)
        _u(flags, _U32, "rename flags")

    def link(self, nodeid: int, newparent: int, newname: bytes) -> Entry:
        _u(nodeid, _U64, "nodeid")
        _name(newname)
        return _entry()

    def open(self, nodeid: int, flags: int, kill_priv: bool = False) -> Opened:
        _u(flags, _U32, "open flags")
        return Opened(5, 0)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int, kill_priv: bool = False, secctx: Any = None
               ) -> tuple[Entry, Opened]:
        _ctx(ctx)
        _name(name)
        _secctx(secctx)
        return _entry(), Opened(5, 0)

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int, umask: int,
                secctx: Any = None) -> tuple[Entry, Opened]:
        _ctx(ctx)
        _secctx(secctx)
        return _entry(), Opened(5, 0)

    def read(self, nodeid: int, fh: int, offset: int, bufs: list[memoryview]) -> int:
        _u(fh, _U64, "fh")
        _u(offset, _U64, "offset")
        total = _bufs(bufs)
        for b in bufs[:1]:
            b[:min(len(b), 5)] = b"data!"[:min(len(b), 5)]
        return total if offset == 0 else total // 2

    def write(self, nodeid: int, fh: int, offset: int, bufs: list[memoryview],
              write_flags: int) -> int:
        _u(write_flags, _U32, "write flags")
        return _bufs(bufs)

    def flush(self, nodeid: int, fh: int, lock_owner: int) -> None:
        _u(lock_owner, _U64, "lock owner")

    def release(self, nodeid: int, fh: int, flags: int, release_flags: int) -> None:
        _u(release_flags, _U32, "release flags")

    def fsync(self, nodeid: int, fh: int, datasync: bool) -> None:
        if type(datasync) is not bool:
            raise Broken(f"datasync {datasync!r}")

    def statfs(self, nodeid: int) -> os.statvfs_result:
        return _STATVFS

    def opendir(self, nodeid: int, flags: int) -> Opened:
        return Opened(6, 0)

    def readdir(self, nodeid: int, fh: int, offset: int) -> Iterator[tuple[int, int, int, bytes]]:
        _u(offset, _U64, "cookie")
        names = [b".", b"..", b"file", b"x" * 255, b"gone"]
        for i, name in enumerate(names[offset % 8:], start=offset % 8):
            yield 10 + i, i + 1, 8, name

    def readdir_lookup(self, nodeid: int, fh: int, name: bytes) -> Entry:
        _name(name)
        if name == b"gone":
            raise FileNotFoundError(2, "vanished")
        return _entry()

    def releasedir(self, nodeid: int, fh: int) -> None:
        _u(fh, _U64, "fh")

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool) -> None:
        self.fsync(nodeid, fh, datasync)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        _ctx(ctx)
        _u(mask, _U32, "mask")

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int,
                 xflags: int = 0) -> None:
        _name(name)
        if type(value) is not bytes:
            raise Broken(f"xattr value {value!r}")
        _u(flags, _U32, "xattr flags")

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        _name(name)
        return b"value"

    def listxattr(self, nodeid: int) -> bytes:
        return b"user.a\0user.b\0"

    def removexattr(self, nodeid: int, name: bytes) -> None:
        _name(name)

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        _u(length, _U64, "length")

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        _u(whence, _U32, "whence")
        return offset

    def copy_file_range(self, fh_in: int, off_in: int, nodeid_out: int, fh_out: int,
                        off_out: int, length: int, flags: int) -> int:
        _u(length, _U32, "copy length")
        return length

    def syncfs(self, nodeid: int) -> None:
        _u(nodeid, _U64, "nodeid")

    def getlk(self, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        for field in lock:
            _u(field, _U64, "lock field")
        return Lock(0, 0, 2, 0)  # F_UNLCK

    def setlk(self, nodeid: int, fh: int, owner: int, lock: Lock, flock: bool,
              sleep: bool) -> None:
        if type(flock) is not bool or type(sleep) is not bool:
            raise Broken(f"setlk flags {flock!r} {sleep!r}")


_fs = CheckingFs()
_bugs = fuse_input.LoggedBugs()
_OPTIONS = {security: FsOptions(shared_dir="/export", xattr=True, security_label=security)
            for security in (False, True)}


def prepare() -> None:
    fuse_input.watch("vfsd.worker.server", _bugs)


def one_input(data: bytes) -> None:
    variant, requests = fuse_input.parse(data)
    options = _OPTIONS[not variant & fuse_input.NO_SECCTX]
    server = FuseServer(_fs, options, session=fuse_input.session(variant, options))
    try:
        for raw, cuts, sizes in requests:
            readable, writable = fuse_input.views(raw, cuts, sizes)
            n = server.handle(readable, writable)
            _bugs.raise_any()
            fuse_input.check_answer(raw, writable, n)
    finally:
        server.close()


def seeds() -> Iterator[bytes]:
    return fuse_input.seeds()
