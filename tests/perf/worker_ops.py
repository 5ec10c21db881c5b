"""In-process microbenchmark of the worker's per-op cost (issue 10 item 4).

Calls PassthroughFs (the `fs.*` rows) and FuseServer.handle (the `srv *` rows: decode + file
system + encode, as the worker runs a request, without the ring and wake-ups) in a loop on a
temporary export; `table.forget` rows are the supervisor's side of a LOOKUP. No rings, no
supervisor, no bench front-end: the numbers are the CPU one op costs, free of the wake-up
noise that `vfsd bench` carries on a 2-core machine.

    .venv/bin/python tests/perf/worker_ops.py [--n 20000] [--repeats 7] [--dir /tmp]
                                              [--create-dir /dev/shm] [--only WORD ...]

Each row: median µs per op of thread CPU time (user + kernel of this thread, so time lost
to other processes is left out) over `repeats` runs of `n` ops, then the minimum, then the
median wall time. LOOKUP rows: "live" looks up names whose entries stay live (a revalidation,
a hard link: find + nlookup += 1); "new" looks up names whose previous entry was forgotten
(the `vfsd bench` lookup workload's pattern: allocate an entry), with the forgets, and
the closing of the forgotten inodes' cached fds, done outside the timed part. CREATE rows
are CREATE + RELEASE + UNLINK of a fresh name (the bench's cycle without the FORGET, which
is the `table.forget ... frees` row), on `--create-dir` (tmpfs by default, so the file
system's own cost does not drown the daemon's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vfsd.frontend.fuse_client import IN_SIZE, OUT_SIZE, build
from vfsd.fs.inode_table import ROOT_ID, InodeTable
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.fuse.options import FsOptions
from workers.passthrough.filesystem import Context
from workers.passthrough.fs import PassthroughFs
from workers.server import FuseServer

NAMES = 64
BATCH = NAMES
Timer = Callable[[int], tuple[int, int]]  # n ops -> (wall ns, cpu ns) of the timed part


def measure(fn: Timer, n: int, repeats: int) -> tuple[float, float, float]:
    """(median cpu, min cpu, median wall) µs per op over `repeats` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = fn(n)
        wall.append(w / n / 1000)
        cpu.append(c / n / 1000)
    return statistics.median(cpu), min(cpu), statistics.median(wall)


def simple(body: Callable[[int], None]) -> Timer:
    def run(n: int) -> tuple[int, int]:
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        body(n)
        return time.perf_counter_ns() - t0, time.thread_time_ns() - c0
    return run


def batched(body: Callable[[], None], untimed: Callable[[], None]) -> Timer:
    """`body` does BATCH ops and is timed; `untimed` (the forgets) runs between batches."""
    def run(n: int) -> tuple[int, int]:
        wall = cpu = 0
        for _ in range(max(1, n // BATCH)):
            c0 = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            body()
            wall += time.perf_counter_ns() - t0
            cpu += time.thread_time_ns() - c0
            untimed()
        return wall, cpu
    return run


class Export:
    """A PassthroughFs + FuseServer over a fresh directory `d` with NAMES empty files."""

    def __init__(self, parent_dir: str) -> None:
        self.top = tempfile.mkdtemp(prefix="vfsd-ops-", dir=parent_dir)
        root = os.path.join(self.top, "export")
        os.makedirs(os.path.join(root, "d"))
        for i in range(NAMES):
            Path(root, "d", f"name{i:04d}").write_bytes(b"")
        self.table = InodeTable.create(1 << 20)  # the supervisor's default capacity
        options = FsOptions(shared_dir=root)
        self.fs = PassthroughFs(options, self.table, 0)
        self.server = FuseServer(self.fs, options, on_destroy=self.table.clear)
        init = build(Opcode.INIT, 0, abi.INIT_IN.pack(7, 38, 131072, 0x7BFFFFFB, 0xB))
        self.wr = [memoryview(bytearray(OUT_SIZE)), memoryview(bytearray(4096))]
        self.call(init)
        self.d = self.fs.lookup(ROOT_ID, b"d").nodeid
        self.names = [b"name%04d" % i for i in range(NAMES)]
        self.serial = 0

    def call(self, req: bytes) -> memoryview:
        self.server.handle([memoryview(req[:IN_SIZE]), memoryview(req[IN_SIZE:])], self.wr)
        return self.wr[1]

    def close(self) -> None:
        self.server.close()
        self.fs.close()
        self.table.close()
        shutil.rmtree(self.top)


def cases(ex: Export, cx: Export) -> list[tuple[str, Timer]]:
    fs, table, d, names = ex.fs, ex.table, ex.d, ex.names
    file0 = fs.lookup(d, names[0]).nodeid
    handle, wr = ex.server.handle, ex.wr
    entry_nodeid = abi.ENTRY_OUT_HEAD.unpack_from

    def split(req: bytes) -> list[memoryview]:
        return [memoryview(req[:IN_SIZE]), memoryview(req[IN_SIZE:])]

    lookup_reqs = [split(build(Opcode.LOOKUP, d, nm + b"\0")) for nm in names]
    getattr_rd = split(build(Opcode.GETATTR, file0, abi.GETATTR_IN.pack(0, 0, 0)))
    got: list[int] = []

    def fs_getattr(n: int) -> None:
        getattr_ = fs.getattr
        for _ in range(n):
            getattr_(file0, None)

    def srv_getattr(n: int) -> None:
        for _ in range(n):
            handle(getattr_rd, wr)

    def fs_lookup_live(n: int) -> None:
        lookup = fs.lookup
        for i in range(n):
            lookup(d, names[i & 63])

    def srv_lookup_live(n: int) -> None:
        for i in range(n):
            handle(lookup_reqs[i & 63], wr)

    def fs_lookup_batch() -> None:
        lookup = fs.lookup
        got.extend(lookup(d, nm).nodeid for nm in names)

    def srv_lookup_batch() -> None:
        w1 = wr[1]
        for rd in lookup_reqs:
            handle(rd, wr)
            got.append(entry_nodeid(w1)[0])

    def forget_got() -> None:
        for nodeid in got:
            table.forget(nodeid, 1)
        got.clear()
        fs.sweep()  # the forgotten inodes' fds close outside the timed LOOKUPs

    def ref_batch() -> None:
        got.extend(fs.lookup(d, nm).nodeid for nm in names)

    def forget_batch() -> None:
        forget = table.forget
        for nodeid in got:
            forget(nodeid, 1)
        got.clear()

    def ref_batch_swept() -> None:
        fs.sweep()
        ref_batch()

    ctx = Context(0, 0, 0)

    def fs_create_batch() -> None:
        f = cx.fs
        create, release, unlink = f.create, f.release, f.unlink
        base = cx.serial
        cx.serial += BATCH
        for i in range(base, base + BATCH):
            name = b"c-%09d" % i
            e, (fh, _) = create(ctx, cx.d, name, 0o100644, os.O_RDWR | os.O_CREAT, 0o022)
            release(e.nodeid, fh, 0, 0)
            unlink(cx.d, name)
            got.append(e.nodeid)

    create_reqs: list[tuple[list[memoryview], list[memoryview]]] = []
    release_req = bytearray(build(Opcode.RELEASE, 0, abi.RELEASE_IN.pack(0, os.O_RDWR, 0, 0)))
    # RELEASE: one request rewritten in place (nodeid in the header, fh in the body).
    hdr = bytearray(release_req[:IN_SIZE])
    body = bytearray(release_req[IN_SIZE:])
    release_rd = [memoryview(hdr), memoryview(body)]
    u64 = struct.Struct("<Q").pack_into

    def next_creates() -> None:
        create_reqs.clear()
        for i in range(cx.serial, cx.serial + BATCH):
            name = b"c-%09d" % i
            create_reqs.append((split(build(Opcode.CREATE, cx.d, abi.CREATE_IN.pack(
                os.O_RDWR | os.O_CREAT, 0o100644, 0o022, 0) + name + b"\0")),
                split(build(Opcode.UNLINK, cx.d, name + b"\0"))))
        cx.serial += BATCH

    next_creates()

    def srv_create_batch() -> None:
        h, w = cx.server.handle, cx.wr
        w1 = w[1]
        fh_of = abi.OPEN_OUT.unpack_from
        for create_rd, unlink_rd in create_reqs:
            h(create_rd, w)
            nodeid = entry_nodeid(w1)[0]
            u64(hdr, 16, nodeid)
            u64(body, 0, fh_of(w1, abi.ENTRY_OUT.size)[0])
            h(release_rd, w)
            h(unlink_rd, w)
            got.append(nodeid)

    def forget_created() -> None:
        for nodeid in got:
            cx.table.forget(nodeid, 1)
        got.clear()
        cx.fs.sweep()  # as the worker loop does: close the fds of forgotten inodes
        next_creates()

    def forget_nofree(n: int) -> None:
        forget = table.forget
        for i in range(n):
            forget(held[i & 63], 1)

    held: list[int] = []
    return [
        ("fs.getattr", simple(fs_getattr)),
        ("srv GETATTR", simple(srv_getattr)),
        ("fs.lookup, entry live", simple(fs_lookup_live)),
        ("srv LOOKUP, entry live", simple(srv_lookup_live)),
        ("table.forget, entry stays (supervisor)", simple(forget_nofree)),
        ("fs.lookup, new entry", batched(fs_lookup_batch, forget_got)),
        ("srv LOOKUP, new entry", batched(srv_lookup_batch, forget_got)),
        ("table.forget, frees (supervisor)", batched(forget_batch, ref_batch_swept)),
        ("fs create+release+unlink", batched(fs_create_batch, forget_created)),
        ("srv CREATE+RELEASE+UNLINK", batched(srv_create_batch, forget_created)),
    ], held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="ops per run")
    ap.add_argument("--repeats", type=int, default=7, help="runs per row (median)")
    ap.add_argument("--dir", default="/tmp", help="where the export is made")
    ap.add_argument("--create-dir", default="/dev/shm", help="export for the CREATE rows")
    ap.add_argument("--only", nargs="*", help="rows whose label contains one of these")
    args = ap.parse_args()
    ex = Export(args.dir)
    cx = Export(args.create_dir)
    try:
        rows, held = cases(ex, cx)
        for label, fn in rows:
            if args.only and not any(o in label for o in args.only):
                continue
            if "live" in label or "stays" in label:
                if not held:  # keep every name's entry live, whatever the rows forget
                    held.extend(ex.fs.lookup(ex.d, nm).nodeid for nm in ex.names)
                    t = ex.table
                    for nodeid in held:
                        t._q[t._ebase + (nodeid & 0xFFFFFFFF) * 24 + 2] = 1 << 40  # nlookup
            elif held:
                for nodeid in held:  # everything the live rows took, back
                    ex.table.forget(nodeid, 1 << 40)
                held.clear()
            n = args.n // 10 if "create" in label.lower() else args.n
            fn(min(n, 2 * BATCH))  # warm up
            cpu, lo, wall = measure(fn, n, args.repeats)
            print(f"{label:42s} cpu {cpu:7.2f} µs/op  (min {lo:6.2f})  wall {wall:7.2f}",
                  flush=True)
    finally:
        ex.close()
        cx.close()


if __name__ == "__main__":
    main()
