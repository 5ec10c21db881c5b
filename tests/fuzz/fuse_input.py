"""The FUSE targets' input layout, reply checks and seeds (shared by fuse_decode and
fuse_passthrough).

Input: `u8 variant`, then requests until the input ends, each
`u8 ncuts, ncuts x u16 cut, u8 nwritable, nwritable x u16 size, u16 length, length bytes`:
the request bytes cut into readable buffers at the cut offsets (descriptor boundaries), and
the writable buffers. Variant bits pick the session: 7.37 instead of 7.38, no SETXATTR_EXT,
no security contexts, no session at all (INIT not yet served).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from tests.fuzz.harness import Broken, Reader, Writer
from vfsd.frontend.fuse_client import (
    INIT_FLAGS2_61,
    INIT_FLAGS_61,
    FuseClient,
    buffers,
    check_reply,
    chunks,
    secctx_ext,
)
from vfsd.fuse import abi
from vfsd.fuse.abi import InitFlags, Opcode
from vfsd.fuse.init import Session, negotiate
from vfsd.fuse.options import FsOptions

MINOR37, NO_SETXATTR_EXT, NO_SECCTX, NO_SESSION = 1, 2, 4, 8
MAX_REQUESTS = 24
_IN, _OUT = 40, 16

#: Exact reply length of a successful request, per opcode (None: variable, bounded by the
#: request's size or the buffer).
REPLY_SIZE: dict[int, int | None] = {
    **dict.fromkeys((Opcode.LOOKUP, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.LINK),
                    _OUT + abi.ENTRY_OUT.size),
    **dict.fromkeys((Opcode.GETATTR, Opcode.SETATTR), _OUT + abi.ATTR_OUT.size),
    **dict.fromkeys((Opcode.OPEN, Opcode.OPENDIR), _OUT + abi.OPEN_OUT.size),
    **dict.fromkeys((Opcode.CREATE, Opcode.TMPFILE),
                    _OUT + abi.ENTRY_OUT.size + abi.OPEN_OUT.size),
    **dict.fromkeys((Opcode.WRITE, Opcode.COPY_FILE_RANGE), _OUT + abi.WRITE_OUT.size),
    Opcode.STATFS: _OUT + abi.STATFS_OUT.size,
    Opcode.INIT: _OUT + abi.INIT_OUT.size,
    Opcode.LSEEK: _OUT + abi.LSEEK_OUT.size,
    Opcode.GETLK: _OUT + abi.LK_OUT.size,
    **dict.fromkeys((Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2, Opcode.RELEASE,
                     Opcode.RELEASEDIR, Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.FLUSH,
                     Opcode.SETXATTR, Opcode.REMOVEXATTR, Opcode.ACCESS, Opcode.FALLOCATE,
                     Opcode.SETLK, Opcode.SETLKW, Opcode.SYNCFS, Opcode.DESTROY), _OUT),
    **dict.fromkeys((Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS, Opcode.READLINK,
                     Opcode.GETXATTR, Opcode.LISTXATTR), None),
}
_BOUNDED_BY_SIZE = {Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS}

Request = tuple[bytes, list[int], list[int]]  # request bytes, cut offsets, writable sizes


def parse(data: bytes) -> tuple[int, list[Request]]:
    r = Reader(data)
    variant = r.u8()
    requests: list[Request] = []
    while r.left and len(requests) < MAX_REQUESTS:
        cuts = [r.u16() for _ in range(r.u8() % 4)]
        sizes = [r.u16() for _ in range(r.u8() % 5)]
        requests.append((r.take(min(r.u16(), r.left)), cuts, sizes))
    return variant, requests


def views(raw: bytes, cuts: list[int], sizes: list[int]
          ) -> tuple[list[memoryview], list[memoryview]]:
    """The request's readable buffers and fresh writable ones."""
    return chunks(raw, cuts), [memoryview(bytearray(n)) for n in sizes]


def session(variant: int, options: FsOptions) -> Session | None:
    """The session INIT would settle for this variant (what the supervisor broadcasts)."""
    if variant & NO_SESSION:
        return None
    flags = INIT_FLAGS_61 | INIT_FLAGS2_61 << 32
    if variant & NO_SETXATTR_EXT:
        flags &= ~InitFlags.SETXATTR_EXT
    if variant & NO_SECCTX:
        flags &= ~InitFlags.SECURITY_CTX
    minor = 37 if variant & MINOR37 else 38
    body = abi.INIT_IN.pack(7, minor, 131072, flags & 0xFFFFFFFF, flags >> 32)
    return negotiate(body, options)[1]


def check_answer(raw: bytes, writable: list[memoryview], n: int | None) -> None:
    """A request's answer is well-formed: nothing, only when there is no header, no room
    or the opcode has no reply; otherwise FUSE framing (check_reply) and, for a success,
    the opcode's reply length."""
    if n is None:
        raise Broken("request deferred (only SETLKW may wait, and the file system never does)")
    room = sum(map(len, writable))
    if len(raw) < _IN:
        if n:
            raise Broken(f"{n}-byte answer to a {len(raw)}-byte request")
        return
    opcode, unique = abi.IN_HEADER.unpack_from(raw)[1:3]
    if n == 0:
        if opcode not in abi.NO_REPLY_OPCODES and room >= _OUT:
            raise Broken(f"opcode {opcode}: no answer, with {room} writable bytes")
        return
    if n > room:
        raise Broken(f"opcode {opcode}: {n} bytes answered into {room}")
    data = b"".join(bytes(v) for v in writable)
    if problem := check_reply(data, n, unique, error=None):
        raise Broken(f"opcode {opcode}: {problem}")
    if abi.OUT_HEADER.unpack_from(data)[1]:
        return
    want = REPLY_SIZE.get(opcode, -1)
    if want == -1:
        raise Broken(f"opcode {opcode} without a handler succeeded")
    if want is not None and n != want:
        raise Broken(f"opcode {opcode}: {n}-byte success, expected {want}")
    if opcode in _BOUNDED_BY_SIZE and len(raw) >= _IN + 24:
        size = abi.READ_IN.unpack_from(raw, _IN)[2]
        if n > _OUT + size:
            raise Broken(f"opcode {opcode}: {n - _OUT} bytes for a {size}-byte request")


class LoggedBugs(logging.Handler):
    """Collects the server's own-bug reports (`log.exception`: an exception it did not
    expect, answered EIO by its catch-all): each one is a crash for the fuzzer."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.records.append(record)

    def raise_any(self) -> None:
        if self.records:
            record = self.records[0]
            self.records.clear()
            trace = logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
            raise Broken(f"{record.getMessage()}:\n{trace}")



def watch(logger_name: str, handler: LoggedBugs) -> None:
    """Send the logger's errors to `handler` only (nothing reaches stderr)."""
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)
    logger.propagate = False


# -- seeds --------------------------------------------------------------------------------------
class _Capture:
    """A `FuseClient` server that only records what the client sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[int]]] = []

    def handle(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        self.sent.append((b"".join(bytes(v) for v in readable), [len(v) for v in writable]))
        return 0


def capture(calls: Callable[[FuseClient], None]) -> list[tuple[bytes, list[int]]]:
    server = _Capture()
    calls(FuseClient(server, uid=1000, gid=1000))  # type: ignore[arg-type]
    return server.sent


def encode(variant: int, requests: list[tuple[bytes, list[int]]]) -> bytes:
    """Linux's shape: the in_header in its own buffer, out_header apart from the body."""
    w = Writer().u8(variant)
    for raw, sizes in requests:
        w.u8(1).u16(_IN).u8(len(sizes))
        for size in sizes:
            w.u16(size)
        w.u16(len(raw)).raw(raw)
    return w.getvalue()


def every_opcode(c: FuseClient) -> None:
    """One request of every opcode the server knows (and a few it does not), with the
    bodies Linux 6.1 sends."""
    ext = secctx_ext()
    c.init()
    c.init(minor=31, flags=abi.InitFlags.ASYNC_READ, flags2=0)
    c.lookup(1, b"hello")
    c.forget(2, 3)
    c.getattr(1)
    c.getattr(2, fh=5)
    c.setattr(2, int(abi.Fattr.MODE | abi.Fattr.SIZE | abi.Fattr.MTIME_NOW), mode=0o640,
              size=17)
    c.call(Opcode.READLINK, 2, out=4095)
    c.symlink(1, b"link", b"target", ext=ext)
    c.mknod(1, b"fifo", 0o10644, ext=ext)
    c.mkdir(1, b"dir", ext=ext)
    c.call(Opcode.MKDIR, 1, abi.MKDIR_IN.pack(0o755, 0o22) + b"dir\0" + ext, out=128)
    c.unlink(1, b"file")
    c.rmdir(1, b"dir")
    c.rename(1, b"a", 1, b"b")
    c.rename(1, b"a", 1, b"b", flags=abi.RENAME_NOREPLACE)
    c.link(2, 1, b"hardlink")
    c.open(2, os.O_RDWR)
    c.read(2, 5, 0, 4096)
    c.write(2, 5, 0, b"hello world\n")
    c.call(Opcode.STATFS, 1, out=80)
    c.release(2, 5)
    c.call(Opcode.FSYNC, 2, abi.FSYNC_IN.pack(5, 1, 0), out=0)
    c.call(Opcode.SETXATTR, 2, abi.SETXATTR_IN_EXT.pack(5, 0, 0, 0) + b"user.a\0value",
           out=0)
    c.call(Opcode.SETXATTR, 2, abi.SETXATTR_IN.pack(5, 0) + b"user.a\0value", out=0)
    c.call(Opcode.GETXATTR, 2, abi.GETXATTR_IN.pack(0, 0) + b"user.a\0", out=8)
    c.call(Opcode.GETXATTR, 2, abi.GETXATTR_IN.pack(64, 0) + b"user.a\0", out=64)
    c.call(Opcode.LISTXATTR, 2, abi.GETXATTR_IN.pack(256, 0), out=256)
    c.call(Opcode.REMOVEXATTR, 2, b"user.a\0", out=0)
    c.call(Opcode.FLUSH, 2, abi.FLUSH_IN.pack(5, 0, 0, 77), out=0)
    c.opendir(1)
    c.readdir(1, 6)
    c.readdir(1, 6, 3, plus=True)
    c.releasedir(1, 6)
    c.call(Opcode.FSYNCDIR, 1, abi.FSYNC_IN.pack(6, 0, 0), out=0)
    lk = abi.LK_IN.pack(5, 77, 0, 99, 1, 1234, 0, 0)
    c.call(Opcode.GETLK, 2, lk, out=24)
    c.call(Opcode.SETLK, 2, lk, out=0)
    c.call(Opcode.SETLKW, 2, abi.LK_IN.pack(5, 77, 0, 0, 2, 0, 1, 0), out=0)
    c.call(Opcode.ACCESS, 2, abi.ACCESS_IN.pack(4, 0), out=0)
    c.create(1, b"new", ext=ext)
    c.call(Opcode.TMPFILE, 1, abi.CREATE_IN.pack(os.O_RDWR, 0o600, 0, 0) + b"/\0" + ext,
           out=144)
    c.call(Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(12), writable=[])
    c.call(Opcode.BMAP, 2, abi.BMAP_IN.pack(0, 4096, 0), out=8)
    c.call(Opcode.IOCTL, 2, abi.IOCTL_IN.pack(5, 0, 0x5401, 0, 0, 0), out=0)
    c.call(Opcode.POLL, 2, abi.POLL_IN.pack(5, 0, 0, 0), out=8)
    c.call(Opcode.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(2, 0)
           + abi.FORGET_ONE.pack(2, 1) + abi.FORGET_ONE.pack(3, 2), writable=[])
    c.call(Opcode.FALLOCATE, 2, abi.FALLOCATE_IN.pack(5, 0, 4096, 0, 0), out=0)
    c.call(Opcode.LSEEK, 2, abi.LSEEK_IN.pack(5, 0, 3, 0), out=8)
    c.call(Opcode.COPY_FILE_RANGE, 2, abi.COPY_FILE_RANGE_IN.pack(5, 0, 3, 7, 0, 4096, 0),
           out=8)
    c.call(Opcode.SYNCFS, 1, abi.SYNCFS_IN.pack(0), out=0)
    c.call(Opcode.SETUPMAPPING, 2, bytes(40), out=0)
    c.call(Opcode.DESTROY, 0, out=0)


def seeds(variants: tuple[int, ...] = (0, MINOR37 | NO_SETXATTR_EXT)) -> Iterator[bytes]:
    sent = capture(every_opcode)
    for variant in variants:
        for i in range(0, len(sent), 4):
            yield encode(variant, sent[i:i + 4])
    yield encode(NO_SESSION, sent[:3])
    yield encode(0, [(bytes(12), [16]), (sent[4][0], [8]), (sent[4][0], [])])
    for writable in (buffers(16 + 4096, [16, 100]), buffers(16 + 104, [8])):
        yield encode(0, [(sent[4][0], [len(v) for v in writable])])
