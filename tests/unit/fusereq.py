"""Build FUSE requests and drive `FuseServer.handle` like a virtio descriptor chain would.

Reusable by daemon tests: `build()` makes request bytes, `chunks()` cuts a byte stream into
memoryviews at arbitrary boundaries, `FuseClient` sends ops and decodes replies.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import NamedTuple

from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode

INIT_FLAGS_61 = 0x7BFFFFFB  # what Linux 6.1.192 offers (PROTOCOLS.md D.4)
INIT_FLAGS2_61 = 0xB


def build(
    opcode: int,
    nodeid: int = 0,
    body: bytes = b"",
    *,
    unique: int = 2,
    uid: int = 0,
    gid: int = 0,
    pid: int = 0,
    ext: bytes = b"",
    length: int | None = None,
) -> bytes:
    """A whole request: 7.38 in_header (+ body + extensions at the end)."""
    assert len(ext) % 8 == 0
    total = abi.IN_HEADER.size + len(body) + len(ext)
    head = abi.IN_HEADER_38.pack(
        total if length is None else length, opcode, unique, nodeid, uid, gid, pid,
        len(ext) // 8, 0,
    )
    return head + body + ext


def secctx_ext(nr: int = 0) -> bytes:
    """The empty security-context extension Linux sends without an LSM ({8, 0})."""
    return abi.EXT_HEADER.pack(8, nr)


def chunks(data: bytes | bytearray, cuts: Sequence[int] = ()) -> list[memoryview]:
    """Copy `data` into separate buffers cut at the given offsets (descriptor boundaries)."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [memoryview(bytearray(data[a:b])) for a, b in itertools.pairwise(bounds) if b > a]


def buffers(total: int, cuts: Sequence[int] = (16,)) -> list[memoryview]:
    """Writable descriptors of `total` bytes, cut at `cuts` (default: header apart)."""
    return chunks(bytes(total), cuts)


def joined(views: Sequence[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


class Reply(NamedTuple):
    error: int  # positive errno, 0 = success
    body: bytes
    written: int


class FuseClient:
    """Sends requests through a FuseServer as the guest would, checking reply framing."""

    def __init__(self, server, *, uid: int = 0, gid: int = 0) -> None:
        self.server = server
        self.uid = uid
        self.gid = gid
        self._unique = itertools.count(2, 2)

    def call(
        self,
        opcode: int,
        nodeid: int = 0,
        body: bytes = b"",
        *,
        out: int = 4096,
        rcuts: Sequence[int] | None = None,
        wcuts: Sequence[int] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        ext: bytes = b"",
        length: int | None = None,
        writable: list[memoryview] | None = None,
    ) -> Reply:
        unique = next(self._unique)
        req = build(opcode, nodeid, body, unique=unique,
                    uid=self.uid if uid is None else uid,
                    gid=self.gid if gid is None else gid, pid=os.getpid(), ext=ext,
                    length=length)
        rd = chunks(req, [40] if rcuts is None else rcuts)
        wr = writable if writable is not None else buffers(16 + out, [16] if wcuts is None
                                                           else wcuts)
        n = self.server.handle(rd, wr)
        if n == 0:
            return Reply(0, b"", 0)
        data = joined(wr)
        length_out, error, uniq = abi.OUT_HEADER.unpack_from(data)
        assert uniq == unique, "reply unique mismatch"
        assert length_out == n, f"out.len {length_out} != written {n}"
        assert error <= 0 and (error == 0 or length_out == 16)
        return Reply(-error, data[16:n], n)

    # --- conveniences -------------------------------------------------------------------
    def init(self, minor: int = 38, flags: int = INIT_FLAGS_61, flags2: int = INIT_FLAGS2_61):
        return self.call(Opcode.INIT, 0, abi.INIT_IN.pack(7, minor, 131072, flags, flags2))

    def lookup(self, parent: int, name: bytes, **kw) -> Reply:
        return self.call(Opcode.LOOKUP, parent, name + b"\0", **kw)

    def getattr(self, nodeid: int, fh: int | None = None) -> Reply:
        return self.call(Opcode.GETATTR, nodeid,
                         abi.GETATTR_IN.pack(1 if fh is not None else 0, 0, fh or 0))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, umask: int = 0, **kw):
        return self.call(Opcode.MKDIR, parent, abi.MKDIR_IN.pack(mode, umask) + name + b"\0",
                         **kw)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, **kw) -> Reply:
        return self.call(Opcode.MKNOD, parent,
                         abi.MKNOD_IN.pack(mode, rdev, 0, 0) + name + b"\0", **kw)

    def symlink(self, parent: int, name: bytes, target: bytes, **kw) -> Reply:
        return self.call(Opcode.SYMLINK, parent, name + b"\0" + target + b"\0", **kw)

    def create(self, parent: int, name: bytes, flags: int = os.O_RDWR, mode: int = 0o644,
               umask: int = 0, **kw) -> Reply:
        return self.call(Opcode.CREATE, parent,
                         abi.CREATE_IN.pack(flags | os.O_CREAT, mode, umask, 0) + name + b"\0",
                         **kw)

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> Reply:
        return self.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0))

    def opendir(self, nodeid: int) -> Reply:
        return self.call(Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0))

    def read(self, nodeid: int, fh: int, offset: int, size: int, **kw) -> Reply:
        return self.call(Opcode.READ, nodeid, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
                         out=kw.pop("out", size), **kw)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, **kw) -> Reply:
        return self.call(Opcode.WRITE, nodeid,
                         abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data, **kw)

    def release(self, nodeid: int, fh: int, opcode: int = Opcode.RELEASE) -> Reply:
        return self.call(opcode, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0))

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096,
                plus: bool = False) -> Reply:
        op = Opcode.READDIRPLUS if plus else Opcode.READDIR
        return self.call(op, nodeid, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), out=size)

    def unlink(self, parent: int, name: bytes) -> Reply:
        return self.call(Opcode.UNLINK, parent, name + b"\0")

    def rmdir(self, parent: int, name: bytes) -> Reply:
        return self.call(Opcode.RMDIR, parent, name + b"\0")

    def rename(self, olddir: int, old: bytes, newdir: int, new: bytes, flags: int = 0):
        if flags:
            return self.call(Opcode.RENAME2, olddir,
                             abi.RENAME2_IN.pack(newdir, flags, 0) + old + b"\0" + new + b"\0")
        return self.call(Opcode.RENAME, olddir,
                         abi.RENAME_IN.pack(newdir) + old + b"\0" + new + b"\0")

    def link(self, nodeid: int, newparent: int, name: bytes) -> Reply:
        return self.call(Opcode.LINK, newparent, abi.LINK_IN.pack(nodeid) + name + b"\0")

    def setattr(self, nodeid: int, valid: int, *, fh: int = 0, size: int = 0, atime: int = 0,
                mtime: int = 0, atimensec: int = 0, mtimensec: int = 0, mode: int = 0,
                uid: int = 0, gid: int = 0) -> Reply:
        body = abi.SETATTR_IN.pack(valid, 0, fh, size, 0, atime, mtime, 0, atimensec,
                                   mtimensec, 0, mode, 0, uid, gid, 0)
        return self.call(Opcode.SETATTR, nodeid, body)


def entry(reply: Reply) -> tuple[int, tuple[int, ...]]:
    """(nodeid, fuse_attr fields) of a fuse_entry_out reply."""
    assert reply.error == 0, os.strerror(reply.error)
    f = abi.ENTRY_OUT.unpack_from(reply.body)
    return f[0], f[6:]


def attr(reply: Reply) -> tuple[int, ...]:
    assert reply.error == 0, os.strerror(reply.error)
    return abi.ATTR_OUT.unpack_from(reply.body)[3:]


def open_fh(reply: Reply, offset: int = 0) -> tuple[int, int]:
    """(fh, open_flags) of a fuse_open_out (at `offset`, 128 for CREATE replies)."""
    assert reply.error == 0, os.strerror(reply.error)
    fh, flags, _ = abi.OPEN_OUT.unpack_from(reply.body, offset)
    return fh, flags


class Dirent(NamedTuple):
    ino: int
    off: int
    type: int
    name: bytes
    nodeid: int = 0
    attr: tuple[int, ...] = ()


def parse_dirents(body: bytes, plus: bool = False) -> list[Dirent]:
    out, pos = [], 0
    while pos < len(body):
        if plus:
            f = abi.DIRENTPLUS_HEAD.unpack_from(body, pos)
            ino, off, namelen, typ = f[-4:]
            name = body[pos + 152:pos + 152 + namelen]
            out.append(Dirent(ino, off, typ, name, f[0], f[6:22]))
            pos += abi.direntplus_size(namelen)
        else:
            ino, off, namelen, typ = abi.DIRENT.unpack_from(body, pos)
            out.append(Dirent(ino, off, typ, body[pos + 24:pos + 24 + namelen]))
            pos += abi.dirent_size(namelen)
    assert pos == len(body), "records must be whole"
    return out

