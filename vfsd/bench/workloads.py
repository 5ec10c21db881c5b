"""The standard workloads: what each request looks like and what a correct reply is.

Everything, set-up included, goes through FUSE on the back-end's socket, so a workload runs
against any virtio-fs back-end. Files live under `/vfsd-bench/` in the export and are reused
by later runs (the 10 000-entry directory takes a second to make).

| workload | requests | op = |
|---|---|---|
| getattr | GETATTR of one file | one request |
| lookup  | LOOKUP of 64 names in turn; a FORGET on hiprio after each | one LOOKUP |
| read4k / write4k | 4 KiB at random 4 KiB-aligned offsets of one open file | one request |
| read1m / write1m | sequential 1 MiB (max_write / max_pages permitting) | one request |
| create  | CREATE + RELEASE + UNLINK (+ FORGET) of a fresh name | one cycle |
| readdir | OPENDIR, READDIR (4 KiB) until empty, RELEASEDIR, of 10 000 entries | one READDIR |
"""

from __future__ import annotations

import errno
import os
import random
import stat
from dataclasses import dataclass
from typing import ClassVar

from vfsd.bench.engine import BenchError, Engine, RunStats, Slot
from vfsd.frontend.fuse_client import (
    OUT_SIZE,
    FuseClient,
    InitReply,
    VhostTransport,
    build,
    entry,
    open_fh,
)
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode

MiB = 1 << 20
BENCH_DIR = b"vfsd-bench"
ATTR_REPLY = OUT_SIZE + abi.ATTR_OUT.size  # 120
ENTRY_REPLY = OUT_SIZE + abi.ENTRY_OUT.size  # 144
OPEN_REPLY = OUT_SIZE + abi.OPEN_OUT.size  # 32
CREATE_REPLY = OUT_SIZE + abi.ENTRY_OUT.size + abi.OPEN_OUT.size  # 160
WRITE_REPLY = OUT_SIZE + abi.WRITE_OUT.size  # 24
FORGET_BATCH = 512


@dataclass
class Options:
    """Workload knobs (the CLI exposes each one)."""

    file_size: int = 64 * MiB  # the data file read4k/write4k/read1m/write1m use
    dir_entries: int = 10_000  # readdir's directory
    handles: int = 1  # OPENs of the data file; slot i uses handle i % handles
    lookup_names: int = 64
    io_size: int = MiB  # read1m / write1m request size (capped by the INIT reply)
    seed: int = 1


class Context:
    """A started session: the client, the engine, INIT's answer and the bench directory."""

    def __init__(self, transport: VhostTransport, engine: Engine, init: InitReply,
                 options: Options) -> None:
        self.transport = transport
        self.fuse = FuseClient(transport)
        self.engine = engine
        self.init = init
        self.options = options
        self.base = ensure_dir(self.fuse, 1, BENCH_DIR)

    @property
    def write_chunk(self) -> int:
        return min(self.options.io_size, self.init.max_write or 4096)

    @property
    def read_chunk(self) -> int:
        pages = self.init.max_pages or 32  # FUSE_DEFAULT_MAX_PAGES_PER_REQ without MAX_PAGES
        return min(self.options.io_size, pages * 4096)


# -- set-up helpers ------------------------------------------------------------------------------
def _check(reply_error: int, what: str) -> None:
    if reply_error:
        raise BenchError(f"set-up: {what}: {os.strerror(reply_error)}")


def ensure_dir(fuse: FuseClient, parent: int, name: bytes) -> int:
    """nodeid of directory `name` in `parent`, made if missing (holds one lookup)."""
    reply = fuse.lookup(parent, name)
    if reply.error == errno.ENOENT or (reply.error == 0 and entry(reply)[0] == 0):
        reply = fuse.mkdir(parent, name, 0o755)
    _check(reply.error, f"directory {name.decode()}")
    return entry(reply)[0]


def ensure_file(ctx: Context, name: bytes, size: int) -> int:
    """nodeid of a regular file of at least `size` bytes under the bench dir (written with
    pipelined WRITEs if it is shorter)."""
    fuse = ctx.fuse
    reply = fuse.lookup(ctx.base, name)
    if reply.error == 0 and entry(reply)[0]:
        nodeid, attrs = entry(reply)
        if attrs[1] >= size:
            return nodeid
        opened = fuse.open(nodeid, os.O_RDWR)
        _check(opened.error, f"open {name.decode()}")
        fh = open_fh(opened)[0]
    else:
        created = fuse.create(ctx.base, name, os.O_RDWR, stat.S_IFREG | 0o644)
        _check(created.error, f"create {name.decode()}")
        nodeid, _ = entry(created)
        fh = open_fh(created, abi.ENTRY_OUT.size)[0]
    chunk = ctx.write_chunk
    data = random.Random(ctx.options.seed).randbytes(chunk)
    requests = []
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        body = abi.WRITE_IN.pack(fh, off, n, 0, 0, 0, 0) + data[:n]
        requests.append((build(Opcode.WRITE, nodeid, body, unique=fuse.next_unique()),
                         abi.WRITE_OUT.size))
    for used, data_out in ctx.transport.call_many(requests, depth=8):
        if used < OUT_SIZE or abi.OUT_HEADER.unpack_from(data_out)[1]:
            raise BenchError(f"set-up: writing {name.decode()} failed")
    _check(fuse.release(nodeid, fh).error, "release")
    return nodeid


def batch_forget(ctx: Context, items: list[tuple[int, int]]) -> None:
    """Drop lookup counts taken during set-up (BATCH_FORGET on hiprio, no reply)."""
    client = ctx.transport.client
    for i in range(0, len(items), FORGET_BATCH):
        part = items[i : i + FORGET_BATCH]
        body = abi.BATCH_FORGET_IN.pack(len(part), 0) + b"".join(
            abi.FORGET_ONE.pack(n, c) for n, c in part)
        client.submit(0, [build(Opcode.BATCH_FORGET, 0, body, unique=ctx.fuse.next_unique())])
        if len(client.wait(0, timeout=10)) != 1:
            raise BenchError("set-up: BATCH_FORGET was not completed")


def make_entries(ctx: Context, parent: int, names: list[bytes]) -> None:
    """MKNOD regular files `names` in `parent` (EEXIST is fine), pipelined; forgets them."""
    fuse = ctx.fuse
    requests = [(build(Opcode.MKNOD, parent, abi.MKNOD_IN.pack(stat.S_IFREG | 0o644, 0, 0, 0)
                       + name + b"\0", unique=fuse.next_unique()), abi.ENTRY_OUT.size)
                for name in names]
    forgets = []
    for used, data in ctx.transport.call_many(requests, depth=64):
        if used < OUT_SIZE:
            raise BenchError("set-up: MKNOD without a reply")
        err = -abi.OUT_HEADER.unpack_from(data)[1]
        if err == 0:
            forgets.append((abi.ENTRY_OUT.unpack_from(data, OUT_SIZE)[0], 1))
        elif err != errno.EEXIST:
            raise BenchError(f"set-up: MKNOD: {os.strerror(err)}")
    batch_forget(ctx, forgets)


# -- workloads ---------------------------------------------------------------------------------
class Workload:
    """Base: subclasses set `name`, prepare in `setup`, and issue in `start`/`on_reply`."""

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "op"
    # Sample the daemon's fds of deleted files during the run (deleted_fds_peak).
    watch_orphans: ClassVar[bool] = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.engine = ctx.engine
        self.rng = random.Random(ctx.options.seed)
        self._nodeids: list[tuple[int, int]] = []  # lookups to give back in teardown

    def setup(self) -> None:
        """Make files, open handles (synchronous FUSE calls; not timed)."""

    def slot_sizes(self) -> tuple[int, int]:
        """(readable payload, reply body) bytes each slot needs."""
        return 0, 0

    def start(self, slot: Slot) -> None:
        raise NotImplementedError

    def on_reply(self, slot: Slot, ok: bool, stopping: bool) -> int:
        if not stopping:
            self.start(slot)
        return 1

    def teardown(self) -> None:
        if self._nodeids:
            batch_forget(self.ctx, self._nodeids)
            self._nodeids = []

    def extra(self, stats: RunStats) -> dict[str, float]:
        """Workload-specific numbers for the report."""
        return {}


class Getattr(Workload):
    name = "getattr"

    def setup(self) -> None:
        self.nodeid = ensure_file(self.ctx, b"getattr", 0)
        self._nodeids.append((self.nodeid, 1))

    def start(self, slot: Slot) -> None:
        abi.GETATTR_IN.pack_into(slot.args, 0, 0, 0, 0)
        self.engine.submit(slot, Opcode.GETATTR, self.nodeid, abi.GETATTR_IN.size,
                           out_len=abi.ATTR_OUT.size, length=ATTR_REPLY)


class Lookup(Workload):
    """LOOKUP, then FORGET the returned nodeid on hiprio (as the guest's dcache does)."""

    name = "lookup"

    def setup(self) -> None:
        self.dir = ensure_dir(self.ctx.fuse, self.ctx.base, b"lookup")
        self._nodeids.append((self.dir, 1))
        self.names = [b"name%04d" % i for i in range(self.ctx.options.lookup_names)]
        make_entries(self.ctx, self.dir, self.names)
        self.next = 0

    def start(self, slot: Slot) -> None:
        name = self.names[self.next]
        self.next = (self.next + 1) % len(self.names)
        n = len(name)
        slot.args[:n] = name
        slot.args[n] = 0
        self.engine.submit(slot, Opcode.LOOKUP, self.dir, n + 1, out_len=abi.ENTRY_OUT.size,
                           length=ENTRY_REPLY)

    def on_reply(self, slot: Slot, ok: bool, stopping: bool) -> int:
        if ok:
            nodeid = abi.ENTRY_OUT_HEAD.unpack_from(slot.body)[0]
            if nodeid:
                self.engine.forget(nodeid, 1)
        return super().on_reply(slot, ok, stopping)

    def extra(self, stats: RunStats) -> dict[str, float]:
        return {"forgets": stats.forgets}


class _FileIo(Workload):
    """Shared by the read/write workloads: one data file, `handles` open fhs."""

    write = False

    def setup(self) -> None:
        ctx = self.ctx
        self.chunk = self.io_size()
        size = max(ctx.options.file_size, self.chunk)
        self.size = size - size % self.chunk
        self.nodeid = ensure_file(ctx, b"data", self.size)
        self._nodeids.append((self.nodeid, 1))
        self.fhs = []
        for _ in range(max(1, ctx.options.handles)):
            reply = ctx.fuse.open(self.nodeid, os.O_RDWR)
            _check(reply.error, "open data")
            self.fhs.append(open_fh(reply)[0])
        self.blocks = self.size // self.chunk
        self.cursor = 0

    def io_size(self) -> int:
        raise NotImplementedError

    def slot_sizes(self) -> tuple[int, int]:
        return (self.chunk, 0) if self.write else (0, self.chunk)

    def offset(self) -> int:
        return self.rng.randrange(self.blocks) * self.chunk

    def start(self, slot: Slot) -> None:
        if "fh" not in slot.state:
            slot.state["fh"] = self.fhs[slot.index % len(self.fhs)]
            if self.write:
                slot.data[: self.chunk] = self.rng.randbytes(self.chunk)
        fh = slot.state["fh"]
        n = self.chunk
        if self.write:
            abi.WRITE_IN.pack_into(slot.args, 0, fh, self.offset(), n, 0, 0, os.O_RDWR, 0)
            self.engine.submit(slot, Opcode.WRITE, self.nodeid, abi.WRITE_IN.size, data_len=n,
                               out_len=abi.WRITE_OUT.size, length=WRITE_REPLY, io=n)
        else:
            abi.READ_IN.pack_into(slot.args, 0, fh, self.offset(), n, 0, 0, os.O_RDWR, 0)
            self.engine.submit(slot, Opcode.READ, self.nodeid, abi.READ_IN.size, out_len=n,
                               length=OUT_SIZE + n, io=n)

    def on_reply(self, slot: Slot, ok: bool, stopping: bool) -> int:
        if ok and self.write:
            written = abi.WRITE_OUT.unpack_from(slot.body)[0]
            if written != self.chunk:
                self.engine.fail(slot, f"{self.name}: wrote {written} of {self.chunk} bytes")
        return super().on_reply(slot, ok, stopping)

    def teardown(self) -> None:
        for fh in self.fhs:
            self.ctx.fuse.release(self.nodeid, fh)
        super().teardown()

    def extra(self, stats: RunStats) -> dict[str, float]:
        return {"io_size": self.chunk, "handles": len(self.fhs)}


class Read4k(_FileIo):
    name = "read4k"

    def io_size(self) -> int:
        return 4096


class Write4k(_FileIo):
    name = "write4k"
    write = True

    def io_size(self) -> int:
        return 4096


class Read1m(_FileIo):
    name = "read1m"

    def io_size(self) -> int:
        return self.ctx.read_chunk

    def offset(self) -> int:
        off = self.cursor * self.chunk
        self.cursor = (self.cursor + 1) % self.blocks
        return off


class Write1m(Read1m):
    name = "write1m"
    write = True

    def io_size(self) -> int:
        return self.ctx.write_chunk


class Create(Workload):
    """CREATE a fresh name, RELEASE it, UNLINK it, FORGET its nodeid: one op per cycle."""

    name = "create"
    unit = "cycle"
    watch_orphans = True

    def setup(self) -> None:
        self.dir = ensure_dir(self.ctx.fuse, self.ctx.base, b"create")
        self._nodeids.append((self.dir, 1))
        self.serial = 0

    def start(self, slot: Slot) -> None:
        self.serial += 1
        name = b"c%03d-%09d" % (slot.index % 1000, self.serial)
        st = slot.state
        st["name"] = name
        st["step"] = 0
        abi.CREATE_IN.pack_into(slot.args, 0, os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o644,
                                0o022, 0)
        pos = abi.CREATE_IN.size
        slot.args[pos : pos + len(name)] = name
        slot.args[pos + len(name)] = 0
        self.engine.submit(slot, Opcode.CREATE, self.dir, pos + len(name) + 1,
                           out_len=abi.ENTRY_OUT.size + abi.OPEN_OUT.size, length=CREATE_REPLY)

    def on_reply(self, slot: Slot, ok: bool, stopping: bool) -> int:
        st = slot.state
        step = st["step"]
        engine = self.engine
        if step == 0:
            if not ok:  # nothing was created: next name
                if not stopping:
                    self.start(slot)
                return 0
            st["nodeid"] = nodeid = abi.ENTRY_OUT_HEAD.unpack_from(slot.body)[0]
            fh = abi.OPEN_OUT.unpack_from(slot.body, abi.ENTRY_OUT.size)[0]
            st["step"] = 1
            abi.RELEASE_IN.pack_into(slot.args, 0, fh, os.O_RDWR, 0, 0)
            engine.submit(slot, Opcode.RELEASE, nodeid, abi.RELEASE_IN.size, length=OUT_SIZE)
            return 0
        if step == 1:
            name = st["name"]
            st["step"] = 2
            slot.args[: len(name)] = name
            slot.args[len(name)] = 0
            engine.submit(slot, Opcode.UNLINK, self.dir, len(name) + 1, length=OUT_SIZE)
            return 0
        engine.forget(st["nodeid"], 1)
        if not stopping:
            self.start(slot)
        return 1 if ok else 0

    def extra(self, stats: RunStats) -> dict[str, float]:
        return {"requests_per_op": 3}


class Readdir(Workload):
    """Full listings of a 10 000-entry directory, `queue_depth` listings at a time."""

    name = "readdir"
    size = 4096  # Linux reads directories a page at a time

    def setup(self) -> None:
        ctx = self.ctx
        n = ctx.options.dir_entries
        self.entries = n
        self.dir = ensure_dir(ctx.fuse, ctx.base, b"readdir-%d" % n)
        self._nodeids.append((self.dir, 1))
        names = [b"f%06d" % i for i in range(n)]
        last = ctx.fuse.lookup(self.dir, names[-1]) if names else None
        if last is not None and (last.error or entry(last)[0] == 0):
            make_entries(ctx, self.dir, names)
        elif last is not None:
            self._nodeids.append((entry(last)[0], 1))
        self.listings = 0
        self.entries_read = 0

    def slot_sizes(self) -> tuple[int, int]:
        return 0, self.size

    def start(self, slot: Slot) -> None:
        slot.state.update(step=0, offset=0, seen=0)
        abi.OPEN_IN.pack_into(slot.args, 0, os.O_RDONLY | os.O_DIRECTORY, 0)
        self.engine.submit(slot, Opcode.OPENDIR, self.dir, abi.OPEN_IN.size,
                           out_len=abi.OPEN_OUT.size, length=OPEN_REPLY)

    def _readdir(self, slot: Slot) -> None:
        st = slot.state
        abi.READ_IN.pack_into(slot.args, 0, st["fh"], st["offset"], self.size, 0, 0,
                              os.O_RDONLY | os.O_DIRECTORY, 0)
        self.engine.submit(slot, Opcode.READDIR, self.dir, abi.READ_IN.size, out_len=self.size,
                           max_length=OUT_SIZE + self.size)

    def _release(self, slot: Slot) -> None:
        slot.state["step"] = 2
        abi.RELEASE_IN.pack_into(slot.args, 0, slot.state["fh"], 0, 0, 0)
        self.engine.submit(slot, Opcode.RELEASEDIR, self.dir, abi.RELEASE_IN.size,
                           length=OUT_SIZE)

    def on_reply(self, slot: Slot, ok: bool, stopping: bool) -> int:
        st = slot.state
        step = st["step"]
        if step == 0:
            if not ok:
                if not stopping:
                    self.start(slot)
                return 0
            st["fh"] = abi.OPEN_OUT.unpack_from(slot.body)[0]
            st["step"] = 1
            self._readdir(slot)
            return 0
        if step == 1:
            if not ok:
                self._release(slot)
                return 1
            n = abi.OUT_HEADER.unpack_from(slot.out)[0] - OUT_SIZE
            if n == 0:
                self._release(slot)
                return 1
            problem = self._walk(slot, n)
            if problem:
                self.engine.fail(slot, f"readdir: {problem}")
                self._release(slot)
            else:
                self._readdir(slot)
            return 1
        if ok:
            self.listings += 1
            if st["seen"] != self.entries:
                self.engine.fail(slot, f"readdir: listing had {st['seen']} entries, expected "
                                       f"{self.entries}")
        if not stopping:
            self.start(slot)
        return 0

    def _walk(self, slot: Slot, n: int) -> str | None:
        """Count the records (names other than . and ..) and remember the last offset."""
        body = slot.body
        st = slot.state
        unpack = abi.DIRENT.unpack_from
        pos = 0
        seen = 0
        off = st["offset"]
        while pos + 24 <= n:
            _ino, off, namelen, _type = unpack(body, pos)
            if not (namelen <= 2 and body[pos + 24] == 0x2E and (
                    namelen == 1 or body[pos + 25] == 0x2E)):
                seen += 1
            pos += (24 + namelen + 7) & ~7
        if pos != n:
            return f"READDIR body of {n} bytes ends inside a record"
        st["offset"] = off
        st["seen"] += seen
        self.entries_read += seen
        return None

    def extra(self, stats: RunStats) -> dict[str, float]:
        secs = stats.elapsed_ns / 1e9 or 1.0
        return {"listings": self.listings, "entries_per_s": round(self.entries_read / secs)}


WORKLOADS: dict[str, type[Workload]] = {
    w.name: w for w in (Getattr, Lookup, Read4k, Write4k, Read1m, Write1m, Create, Readdir)
}
