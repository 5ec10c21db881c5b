"""A FUSE-level client: builds requests with `vfsd.fuse.abi` and checks every reply's framing.

Shared by the test suite and `vfsd bench`, so both speak to a back-end the way the guest's
`virtiofs.ko` does. Three pieces, usable on their own:

* `build()` / `check_reply()` - pure request encoder and reply validator (the bench calls the
  validator on every completion; a reply with the wrong `unique`, a positive or unexpected
  `error`, or a length that is not exactly what the op answers is an error);
* `FuseClient` - one call at a time through any "server" object with
  `handle(readable, writable) -> bytes_written` (a `FuseServer` in unit tests, or
  `VhostTransport` over a real back-end socket);
* `VhostTransport` - that interface over a `VhostUserClient` request queue, plus `call_many`
  to pipeline a batch (set-up work such as creating 10 000 files).

Example::

    client = VhostUserClient.connect(path, num_queues=2)
    client.realize()
    client.start()
    fuse = FuseClient(VhostTransport(client))
    init = parse_init(fuse.init())
    nodeid, attrs = entry(fuse.lookup(1, b"file"))
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from vfsd.frontend.vhost_client import VhostUserClient
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode

#: What Linux 6.1 offers in FUSE_INIT (PROTOCOLS.md D.4).
INIT_FLAGS_61 = 0x7BFFFFFB
INIT_FLAGS2_61 = 0xB
#: The kernel's FUSE_INIT max_readahead on x86-64 (VM_READAHEAD_PAGES * 4 KiB).
INIT_MAX_READAHEAD = 131072
REQUEST_QUEUE = 1
HIPRIO_QUEUE = 0
IN_SIZE = abi.IN_HEADER.size  # 40
OUT_SIZE = abi.OUT_HEADER.size  # 16


class FuseProtocolError(AssertionError):
    """A reply broke FUSE framing (an AssertionError so test code can treat it as a failure)."""


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
    if len(ext) % 8:
        raise ValueError("extensions are a multiple of 8 bytes")
    total = IN_SIZE + len(body) + len(ext)
    head = abi.IN_HEADER_38.pack(
        total if length is None else length, opcode, unique, nodeid, uid, gid, pid,
        len(ext) // 8, 0,
    )
    return head + body + ext


def secctx_ext(nr: int = 0) -> bytes:
    """The empty security-context extension Linux sends without an LSM ({8, 0})."""
    return abi.EXT_HEADER.pack(8, nr)


def check_reply(header: bytes | memoryview, used_len: int, unique: int, *,
                error: int | None = 0, length: int | None = None,
                max_length: int | None = None) -> str | None:
    """Why a reply is wrong, or None if it is right.

    `header` holds at least the 16-byte fuse_out_header; `used_len` is the device's used
    length. `error`: the expected (non-negative) errno, or None for "any"; `length`: the
    exact total reply length a success must have; `max_length`: an upper bound instead
    (variable-size replies: READDIR, short READ). Error replies are header-only.
    """
    if used_len < OUT_SIZE or len(header) < OUT_SIZE:
        return f"used length {used_len} is shorter than fuse_out_header"
    out_len, out_error, out_unique = abi.OUT_HEADER.unpack_from(header)
    if out_unique != unique:
        return f"unique {out_unique:#x} != request's {unique:#x}"
    if out_len != used_len:
        return f"out.len {out_len} != used length {used_len}"
    if out_error > 0 or out_error <= -512:
        return f"error field {out_error} is not a negative errno"
    if out_error:
        if out_len != OUT_SIZE:
            return f"error reply of {out_len} bytes (must be header only)"
        if error is not None and -out_error != error:
            return f"errno {-out_error} ({os.strerror(-out_error)})" + (
                f", expected {error}" if error else "")
        return None
    if error:
        return f"success, expected errno {error}"
    if length is not None and out_len != length:
        return f"reply of {out_len} bytes, expected {length}"
    if max_length is not None and out_len > max_length:
        return f"reply of {out_len} bytes exceeds the {max_length}-byte buffer"
    return None


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


class Server(Protocol):
    """Anything that serves one chain: `FuseServer`, `VhostTransport`."""

    def handle(self, readable: list[memoryview], writable: list[memoryview]) -> int: ...


class FuseClient:
    """Sends requests through a server as the guest would, checking reply framing."""

    def __init__(self, server: Server, *, uid: int = 0, gid: int = 0) -> None:
        self.server = server
        self.uid = uid
        self.gid = gid
        self._unique = itertools.count(2, 2)

    def next_unique(self) -> int:
        return next(self._unique)

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
        """One request; raises `FuseProtocolError` on a malformed reply."""
        unique = self.next_unique()
        req = build(opcode, nodeid, body, unique=unique,
                    uid=self.uid if uid is None else uid,
                    gid=self.gid if gid is None else gid, pid=os.getpid(), ext=ext,
                    length=length)
        rd = chunks(req, [IN_SIZE] if rcuts is None else rcuts)
        wr = writable if writable is not None else buffers(OUT_SIZE + out, [OUT_SIZE] if wcuts
                                                           is None else wcuts)
        n = self.server.handle(rd, wr)
        if n == 0:
            return Reply(0, b"", 0)
        data = joined(wr)
        problem = check_reply(data, n, unique, error=None)
        if problem:
            raise FuseProtocolError(f"{Opcode(opcode).name}: {problem}")
        error = abi.OUT_HEADER.unpack_from(data)[1]
        return Reply(-error, data[OUT_SIZE:n], n)

    # --- conveniences -------------------------------------------------------------------
    def init(self, minor: int = 38, flags: int = INIT_FLAGS_61, flags2: int = INIT_FLAGS2_61,
             max_readahead: int = INIT_MAX_READAHEAD) -> Reply:
        return self.call(Opcode.INIT, 0,
                         abi.INIT_IN.pack(7, minor, max_readahead, flags, flags2))

    def lookup(self, parent: int, name: bytes, **kw: Any) -> Reply:
        return self.call(Opcode.LOOKUP, parent, name + b"\0", **kw)

    def forget(self, nodeid: int, nlookup: int = 1) -> Reply:
        """FORGET has no reply; the back-end uses the chain with length 0."""
        return self.call(Opcode.FORGET, nodeid, abi.FORGET_IN.pack(nlookup),
                         writable=[])

    def getattr(self, nodeid: int, fh: int | None = None) -> Reply:
        return self.call(Opcode.GETATTR, nodeid,
                         abi.GETATTR_IN.pack(1 if fh is not None else 0, 0, fh or 0))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, umask: int = 0,
              **kw: Any) -> Reply:
        return self.call(Opcode.MKDIR, parent, abi.MKDIR_IN.pack(mode, umask) + name + b"\0",
                         **kw)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, **kw: Any) -> Reply:
        return self.call(Opcode.MKNOD, parent,
                         abi.MKNOD_IN.pack(mode, rdev, 0, 0) + name + b"\0", **kw)

    def symlink(self, parent: int, name: bytes, target: bytes, **kw: Any) -> Reply:
        return self.call(Opcode.SYMLINK, parent, name + b"\0" + target + b"\0", **kw)

    def create(self, parent: int, name: bytes, flags: int = os.O_RDWR, mode: int = 0o644,
               umask: int = 0, **kw: Any) -> Reply:
        return self.call(Opcode.CREATE, parent,
                         abi.CREATE_IN.pack(flags | os.O_CREAT, mode, umask, 0) + name + b"\0",
                         **kw)

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> Reply:
        return self.call(Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0))

    def opendir(self, nodeid: int) -> Reply:
        return self.call(Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0))

    def read(self, nodeid: int, fh: int, offset: int, size: int, **kw: Any) -> Reply:
        return self.call(Opcode.READ, nodeid, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
                         out=kw.pop("out", size), **kw)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, **kw: Any) -> Reply:
        return self.call(Opcode.WRITE, nodeid,
                         abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data, **kw)

    def release(self, nodeid: int, fh: int, opcode: int = Opcode.RELEASE) -> Reply:
        return self.call(opcode, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0))

    def releasedir(self, nodeid: int, fh: int) -> Reply:
        return self.release(nodeid, fh, Opcode.RELEASEDIR)

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096,
                plus: bool = False) -> Reply:
        op = Opcode.READDIRPLUS if plus else Opcode.READDIR
        return self.call(op, nodeid, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), out=size)

    def unlink(self, parent: int, name: bytes) -> Reply:
        return self.call(Opcode.UNLINK, parent, name + b"\0")

    def rmdir(self, parent: int, name: bytes) -> Reply:
        return self.call(Opcode.RMDIR, parent, name + b"\0")

    def rename(self, olddir: int, old: bytes, newdir: int, new: bytes, flags: int = 0) -> Reply:
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


# -- reply decoders ----------------------------------------------------------------------------
def _ok(reply: Reply) -> None:
    if reply.error:
        raise FuseProtocolError(f"errno {reply.error} ({os.strerror(reply.error)})")


def entry(reply: Reply) -> tuple[int, tuple[int, ...]]:
    """(nodeid, fuse_attr fields) of a fuse_entry_out reply."""
    _ok(reply)
    f = abi.ENTRY_OUT.unpack_from(reply.body)
    return f[0], f[6:]


def attr(reply: Reply) -> tuple[int, ...]:
    _ok(reply)
    return abi.ATTR_OUT.unpack_from(reply.body)[3:]


def open_fh(reply: Reply, offset: int = 0) -> tuple[int, int]:
    """(fh, open_flags) of a fuse_open_out (at `offset`, 128 for CREATE replies)."""
    _ok(reply)
    fh, flags, _ = abi.OPEN_OUT.unpack_from(reply.body, offset)
    return fh, flags


class InitReply(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int  # 0 when MAX_PAGES was not negotiated (then 32 pages)


def parse_init(reply: Reply) -> InitReply:
    """Decode a fuse_init_out (older back-ends may send a shorter body: zero-pad it)."""
    _ok(reply)
    body = reply.body.ljust(abi.INIT_OUT.size, b"\0")
    (major, minor, readahead, flags, max_bg, congestion, max_write, time_gran, max_pages,
     _map_alignment, flags2) = abi.INIT_OUT.unpack_from(body)
    if not flags & abi.InitFlags.MAX_PAGES:
        max_pages = 0
    return InitReply(major, minor, readahead, flags | flags2 << 32, max_bg, congestion,
                     max_write, time_gran, max_pages)


class Dirent(NamedTuple):
    ino: int
    off: int
    type: int
    name: bytes
    nodeid: int = 0
    attr: tuple[int, ...] = ()


def parse_dirents(body: bytes | memoryview, plus: bool = False) -> list[Dirent]:
    """Every record of a READDIR(PLUS) body; raises if the last one is cut."""
    out, pos = [], 0
    while pos < len(body):
        if plus:
            f = abi.DIRENTPLUS_HEAD.unpack_from(body, pos)
            ino, off, namelen, typ = f[-4:]
            name = bytes(body[pos + 152:pos + 152 + namelen])
            out.append(Dirent(ino, off, typ, name, f[0], f[6:22]))
            pos += abi.direntplus_size(namelen)
        else:
            ino, off, namelen, typ = abi.DIRENT.unpack_from(body, pos)
            out.append(Dirent(ino, off, typ, bytes(body[pos + 24:pos + 24 + namelen])))
            pos += abi.dirent_size(namelen)
    if pos != len(body):
        raise FuseProtocolError("READDIR records must be whole")
    return out


# -- over a real back-end ----------------------------------------------------------------------
class VhostTransport:
    """`Server` over a `VhostUserClient` request queue: each call is one chain, answered by
    the back-end through guest memory (shaped like Linux's: header and body apart)."""

    def __init__(self, client: VhostUserClient, queue: int = REQUEST_QUEUE,
                 timeout: float = 10.0) -> None:
        self.client = client
        self.queue = queue
        self.timeout = timeout

    def handle(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        queue = HIPRIO_QUEUE if not writable and self._is_forget(readable) else self.queue
        self.client.submit(queue, [bytes(v) for v in readable], [len(v) for v in writable])
        done = self.client.wait(queue, timeout=self.timeout)
        if len(done) != 1:
            raise FuseProtocolError(f"the back-end did not complete a request in "
                                    f"{self.timeout:g} s")
        data = done[0].data
        pos = 0
        for view in writable:
            n = min(len(view), len(data) - pos)
            view[:n] = data[pos : pos + n]
            pos += n
        return done[0].used_len

    @staticmethod
    def _is_forget(readable: list[memoryview]) -> bool:
        head = bytes(readable[0][4:8]) if readable else b""
        return len(head) == 4 and int.from_bytes(head, "little") in (
            Opcode.FORGET, Opcode.BATCH_FORGET)

    def call_many(self, requests: Sequence[tuple[bytes, int]], depth: int = 64
                  ) -> list[tuple[int, bytes]]:
        """Pipeline whole requests (bytes, reply body size) on the request queue, `depth` in
        flight; returns (used_len, reply bytes) in request order. For bulk set-up work."""
        client, queue = self.client, self.queue
        results: list[tuple[int, bytes] | None] = [None] * len(requests)
        order: dict[int, int] = {}
        pending = iter(enumerate(requests))
        inflight = 0
        exhausted = False
        while True:
            while not exhausted and inflight < depth:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                i, (req, out) = item
                head = client.submit(queue, [req[:IN_SIZE], req[IN_SIZE:]] if len(req) > IN_SIZE
                                     else [req], [OUT_SIZE, out] if out else [OUT_SIZE],
                                     kick=False)
                order[head] = i
                inflight += 1
            if inflight == 0:
                break
            client.kick(queue)
            done = client.wait(queue, timeout=self.timeout)
            if not done:
                raise FuseProtocolError(f"no completion in {self.timeout:g} s "
                                        f"({inflight} in flight)")
            for c in done:
                results[order.pop(c.head)] = (c.used_len, c.data)
                inflight -= 1
        return [r for r in results if r is not None]
