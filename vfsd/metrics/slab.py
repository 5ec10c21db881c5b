"""Per-worker metrics slabs in shared memory: lock-free single-writer counters.

Each worker slot owns one slab, a `posix_ipc` segment the supervisor creates *before* it forks
the worker (the name is unlinked as soon as it is mapped, as `vfsd/dispatch/channel.py` does,
so nothing is left in /dev/shm). The worker is the only writer; the supervisor reads the slab
at scrape time without locks. A respawned worker gets a **fresh** slab: `MetricsBook.renew`
folds the dead worker's counters into the book's retired totals first, so no counter ever
goes backwards and no worker writes into a slab it inherited (client_python's "dead process"
bookkeeping, STYLE.md §5).

Layout (every field a native-endian u64 "word"; offsets below are word indexes):

    word 0              MAGIC                       set by the supervisor
    word 1              LAYOUT                      crc32 of the constants below
    word 2              pid of the writer           stamped by `WorkerMetrics.attach()`
    words 8..15         gauges (not folded on retire)
        8               open file/dir handles (fh) of this worker
        9               cached O_PATH inode fds of this worker
    words 16..          counters (summed across slabs and folded into the retired totals)
        16              bytes read by the guest (READ replies)
        17              bytes written by the guest (WRITE payloads)
        24 + op                         latency sum of opcode slot `op`, in ns
        88 + op*N_BUCKETS + b           requests of op slot `op` in latency bucket `b`
        88 + 64*N_BUCKETS + op*N_ERRNO + e
                                        requests of op slot `op` answered with errno slot `e`

`op` is the FUSE opcode for opcodes 1..63 (slot 0 = any opcode >= 64, e.g. CUSE_INIT, or 0);
there is no separate request count: an op's count is the sum of its latency buckets (the same
numbers feed `vfsd_requests_total` and the histogram's `_count`, so they always agree).
Buckets are Prometheus `le` buckets: bucket `b` counts latencies <= BUCKET_BOUNDS_NS[b]; the
last bucket is +Inf.

Every store is one aligned 8-byte store through a `memoryview.cast("Q")` element (never
`struct.pack_into`, which zero-fills first: PROTOCOLS.md trap 23), so a reader sees either the
old or the new value of a word, never a torn one. Words are independent: a scrape can see a
bucket incremented before the matching latency sum; the next scrape catches up.

Writers: `WorkerMetrics.record()` bumps the slab words directly (~0.25 µs a request);
`BufferedWorkerMetrics.record()` bumps a private list and `flush()` copies the changed words
into the slab at most every 100 ms (~0.17 µs a request; counts published a little late).
The supervisor has a slab of its own (`MetricsBook.supervisor`) for the requests it answers
itself.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import operator
import os
import threading
import zlib
from bisect import bisect_left
from dataclasses import dataclass

import posix_ipc

from vfsd.fuse.abi import Opcode

MAGIC = 0x31_4241_4C53_4456  # "VDSLAB1"
OP_SLOTS = 64

#: Upper bounds of the latency buckets, ns: 10 µs ... 10 s in 1-2.5-5 steps (+Inf follows).
BUCKET_BOUNDS_NS: tuple[int, ...] = (
    10_000, 25_000, 50_000,
    100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
    10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000,
    1_000_000_000, 2_500_000_000, 5_000_000_000,
    10_000_000_000,
)
N_BUCKETS = len(BUCKET_BOUNDS_NS) + 1  # the last one is +Inf

#: errno label values: a fixed list of the errnos a FUSE server answers, then "other".
ERRNO_NAMES: tuple[str, ...] = (
    "EPERM", "ENOENT", "EINTR", "EIO", "ENXIO", "E2BIG", "EBADF", "EAGAIN", "ENOMEM",
    "EACCES", "EFAULT", "EBUSY", "EEXIST", "EXDEV", "ENODEV", "ENOTDIR", "EISDIR", "EINVAL",
    "ENFILE", "EMFILE", "ENOTTY", "ETXTBSY", "EFBIG", "ENOSPC", "ESPIPE", "EROFS", "EMLINK",
    "ERANGE", "EDEADLK", "ENAMETOOLONG", "ENOLCK", "ENOSYS", "ENOTEMPTY", "ELOOP", "ENODATA",
    "EPROTO", "EOVERFLOW", "EOPNOTSUPP", "ESTALE", "EDQUOT", "ETIMEDOUT", "ECANCELED",
)
ERRNO_OTHER = len(ERRNO_NAMES)
N_ERRNO = ERRNO_OTHER + 1
ERRNO_LABELS: tuple[str, ...] = (*ERRNO_NAMES, "other")
#: errno value (positive, or negative as in fuse_out_header.error) -> errno slot.
ERRNO_INDEX: dict[int, int] = {}
for _i, _name in enumerate(ERRNO_NAMES):
    ERRNO_INDEX[getattr(errno, _name)] = _i
    ERRNO_INDEX[-getattr(errno, _name)] = _i

#: op slot -> `op` label value (lower-case FUSE opcode name). Slots that are not opcodes (0,
#: 7, 19, and >= 52) are all "unknown"; the collector merges slots with the same label.
OP_LABELS: tuple[str, ...] = tuple(
    Opcode(i).name.lower() if i in Opcode._value2member_map_ else "unknown"
    for i in range(OP_SLOTS)
)

# Word offsets (see the module docstring).
W_MAGIC = 0
W_LAYOUT = 1
W_PID = 2
G_OPEN_HANDLES = 8
G_CACHED_FDS = 9
COUNTER_BASE = 16
C_READ_BYTES = 16
C_WRITTEN_BYTES = 17
SUM_BASE = 24
HIST_BASE = SUM_BASE + OP_SLOTS
ERR_BASE = HIST_BASE + OP_SLOTS * N_BUCKETS
WORDS = ERR_BASE + OP_SLOTS * N_ERRNO
SLAB_BYTES = -(-WORDS * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
N_COUNTERS = WORDS - COUNTER_BASE
LAYOUT = zlib.crc32(repr((OP_SLOTS, BUCKET_BOUNDS_NS, ERRNO_NAMES, WORDS)).encode())

_seq = itertools.count()

#: bit_length(latency) -> the first bucket that can hold it: a power-of-two range holds at most
#: one bound (consecutive bounds are >= 2x apart), so one comparison finishes the search.
_BUCKET_BY_BITS: tuple[int, ...] = tuple(
    bisect_left(BUCKET_BOUNDS_NS, (1 << (k - 1)) if k else 0) for k in range(70))


def bucket_of(latency_ns: int) -> int:
    """The latency bucket of `latency_ns` (Prometheus `le` semantics)."""
    return bisect_left(BUCKET_BOUNDS_NS, latency_ns)


class Slab:
    """One worker's slab. The supervisor creates it (pre-fork); the worker writes it through
    `WorkerMetrics`; the supervisor reads it with `counters()` / `gauges()`."""

    __slots__ = ("_map", "words")

    def __init__(self, tag: str = "w") -> None:
        name = f"/vfsd-{os.getpid()}-m{tag}-{next(_seq)}"
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=SLAB_BYTES)
        try:
            self._map = mmap.mmap(shm.fd, SLAB_BYTES)
        finally:
            shm.close_fd()
            shm.unlink()
        self.words = memoryview(self._map).cast("Q")
        self.words[W_LAYOUT] = LAYOUT
        self.words[W_MAGIC] = MAGIC

    @property
    def pid(self) -> int:
        """The writer's pid (0 until the worker attached)."""
        return self.words[W_PID]

    def counters(self) -> list[int]:
        """A snapshot of the counter words (index 0 = word COUNTER_BASE)."""
        return self.words[COUNTER_BASE:WORDS].tolist()

    def gauges(self) -> tuple[int, int]:
        """(open handles, cached fds) as the worker last set them."""
        w = self.words
        return w[G_OPEN_HANDLES], w[G_CACHED_FDS]

    def close(self) -> None:
        self.words.release()
        try:
            self._map.close()
        except BufferError:  # a view still exported somewhere; the mapping dies with us
            pass


class WorkerMetrics:
    """The worker's writer. Single writer: only the process that owns the slab calls it.

    Hot path: `record()` once per request, ~0.25 µs, every store straight into the slab
    (visible to the next scrape at once, nothing lost if the worker dies).
    `BufferedWorkerMetrics` is the same API at ~0.16 µs per request, published by `flush()`.
    """

    __slots__ = ("_slab_w", "_w", "slab")

    def __init__(self, slab: Slab) -> None:
        self.slab = slab
        self._slab_w = slab.words  # gauges and the pid always go straight to the slab
        self._w = slab.words  # where record() adds

    def attach(self) -> None:
        """Stamp the writer's pid (call once in the worker after fork)."""
        self._slab_w[W_PID] = os.getpid()

    def record(self, opcode: int, error: int, latency_ns: int, bytes_read: int = 0,
               bytes_written: int = 0, *, _tab=_BUCKET_BY_BITS, _bounds=BUCKET_BOUNDS_NS,
               _errno=ERRNO_INDEX.get) -> None:
        """Account one request: `opcode` (fuse_in_header.opcode), `error` (the errno it was
        answered with, positive or negative as in fuse_out_header; 0 = success),
        `latency_ns` (>= 0), payload bytes read (READ) and written (WRITE)."""
        w = self._w
        if opcode >> 6:  # >= OP_SLOTS
            opcode = 0
        w[24 + opcode] += latency_ns  # SUM_BASE
        b = _tab[latency_ns.bit_length()]  # = bisect_left(_bounds, latency_ns), faster
        if b < 19 and latency_ns > _bounds[b]:
            b += 1
        w[88 + opcode * 20 + b] += 1  # HIST_BASE, N_BUCKETS
        if error:
            w[1368 + opcode * 43 + _errno(error, 42)] += 1  # ERR_BASE, N_ERRNO, ERRNO_OTHER
        if bytes_read:
            w[16] += bytes_read  # C_READ_BYTES
        if bytes_written:
            w[17] += bytes_written  # C_WRITTEN_BYTES

    def set_state(self, open_handles: int, cached_fds: int) -> None:
        """Gauges only the worker knows (call once per batch, or from the idle sweep)."""
        w = self._slab_w
        w[G_OPEN_HANDLES] = open_handles
        w[G_CACHED_FDS] = cached_fds

    def maybe_flush(self, now_ns: int) -> None:
        """Nothing to publish: every record() already is (see BufferedWorkerMetrics)."""

    def flush(self) -> None:
        """Nothing to publish: every record() already is (see BufferedWorkerMetrics)."""


class BufferedWorkerMetrics(WorkerMetrics):
    """`record()` adds into a private list (a list item costs ~25 ns to bump, a shared
    memoryview item ~60 ns); `flush()` publishes the changed words into the slab, one aligned
    store per word. The worker calls `maybe_flush(now_ns)` once per loop turn, idle turns
    included (it publishes at most every `interval` s, 10-100 µs each time), and `flush()`
    before it exits. Published counts are at most max(interval, the idle wait) late; a worker
    that dies loses what it recorded since its last flush."""

    __slots__ = ("_interval_ns", "_next_ns", "_published")

    def __init__(self, slab: Slab, interval: float = 0.1) -> None:
        super().__init__(slab)
        self._w = [0] * WORDS  # type: ignore[assignment]
        self._published = [0] * WORDS
        self._interval_ns = int(interval * 1e9)
        self._next_ns = 0

    def maybe_flush(self, now_ns: int) -> None:
        if now_ns >= self._next_ns:
            self._next_ns = now_ns + self._interval_ns
            self.flush()

    def flush(self) -> None:
        src, done, dst = self._w, self._published, self._slab_w
        if src == done:  # idle since the last flush (a C-level compare, ~10 µs)
            return
        step = 64  # compare whole runs of words in C; store only the runs that changed
        for start in range(COUNTER_BASE, WORDS, step):
            end = min(start + step, WORDS)
            if src[start:end] != done[start:end]:
                for i in range(start, end):
                    v = src[i]
                    if v != done[i]:
                        dst[i] = v
                        done[i] = v


# record() inlines the layout for speed; keep it honest.
assert (SUM_BASE, HIST_BASE, N_BUCKETS, ERR_BASE, N_ERRNO, ERRNO_OTHER, OP_SLOTS) == \
    (24, 88, 20, 1368, 43, 42, 64), "update the constants inlined in WorkerMetrics.record"
assert all(b / a >= 2 for a, b in itertools.pairwise(BUCKET_BOUNDS_NS)), "see _BUCKET_BY_BITS"
assert (C_READ_BYTES, C_WRITTEN_BYTES) == (16, 17)


class Counters:
    """Read helpers over a counter snapshot (a list of N_COUNTERS ints)."""

    __slots__ = ("values",)

    def __init__(self, values: list[int] | None = None) -> None:
        self.values = values if values is not None else [0] * N_COUNTERS

    def __add__(self, other: Counters) -> Counters:
        return Counters(list(map(operator.add, self.values, other.values)))

    @property
    def bytes_read(self) -> int:
        return self.values[C_READ_BYTES - COUNTER_BASE]

    @property
    def bytes_written(self) -> int:
        return self.values[C_WRITTEN_BYTES - COUNTER_BASE]

    def latency_sum_ns(self, op: int) -> int:
        return self.values[SUM_BASE - COUNTER_BASE + op]

    def buckets(self, op: int) -> list[int]:
        """Per-bucket (not cumulative) counts of op slot `op`; the last one is +Inf."""
        start = HIST_BASE - COUNTER_BASE + op * N_BUCKETS
        return self.values[start : start + N_BUCKETS]

    def count(self, op: int) -> int:
        return sum(self.buckets(op))

    def errors(self, op: int) -> list[int]:
        """Per-errno-slot counts of op slot `op` (index ERRNO_OTHER = "other")."""
        start = ERR_BASE - COUNTER_BASE + op * N_ERRNO
        return self.values[start : start + N_ERRNO]


def cumulative(buckets: list[int]) -> list[int]:
    """Prometheus `le` buckets are cumulative: running sums of the per-bucket counts."""
    return list(itertools.accumulate(buckets))


@dataclass(frozen=True, slots=True)
class BookSnapshot:
    counters: Counters  # retired + every live slab
    gauges: dict[int, tuple[int, int, int]]  # slot -> (writer pid, open handles, cached fds)
    restarts: list[int]  # per slot: how many times a slab was renewed over a dead one


class MetricsBook:
    """The supervisor's slabs: one per worker slot, one for the supervisor's own replies
    (`book.supervisor`, a `WorkerMetrics`), plus the totals of retired slabs.

    `renew()` runs in the supervisor's main thread (spawn path), `snapshot()` in the metrics
    HTTP thread; a lock (never taken by workers) keeps a scrape from reading a slab while it is
    being folded and unmapped.
    """

    def __init__(self, slots: int = 0) -> None:
        self._lock = threading.Lock()
        self._slabs: list[Slab | None] = [None] * slots
        self._restarts: list[int] = [0] * slots
        self._retired = Counters()
        # Requests the supervisor answers itself (INIT, DESTROY, FORGET, INTERRUPT, and the
        # EIO/EBADF replies for dead workers or foreign fhs): its own slab, in the totals.
        self._own = Slab("s")
        self.supervisor = WorkerMetrics(self._own)
        self._closed = False

    def _grow(self, size: int) -> None:
        while len(self._slabs) < size:
            self._slabs.append(None)
            self._restarts.append(0)

    def renew(self, index: int) -> Slab:
        """A fresh slab for slot `index`, to hand to the worker about to be (re)spawned there.

        The previous slab of the slot (if any) is folded into the retired totals and counts as
        one restart: call this only once its writer is dead (reaped)."""
        slab = Slab(str(index))
        with self._lock:
            self._grow(index + 1)
            old = self._slabs[index]
            if old is not None:
                self._retired = self._retired + Counters(old.counters())
                self._restarts[index] += 1
            self._slabs[index] = slab
        if old is not None:
            old.close()
        return slab

    def retire(self, index: int) -> None:
        """Fold and drop slot `index`'s slab without counting a restart (slot removed)."""
        with self._lock:
            if index >= len(self._slabs) or self._slabs[index] is None:
                return
            old = self._slabs[index]
            assert old is not None
            self._retired = self._retired + Counters(old.counters())
            self._slabs[index] = None
        old.close()

    def slab(self, index: int) -> Slab | None:
        return self._slabs[index] if index < len(self._slabs) else None

    @property
    def slots(self) -> int:
        return len(self._slabs)

    def snapshot(self) -> BookSnapshot:
        with self._lock:
            if self._closed:  # a scrape racing the daemon's shutdown
                return BookSnapshot(Counters(), {}, [])
            total = self._retired + Counters(self._own.counters())
            gauges: dict[int, tuple[int, int, int]] = {}
            for index, slab in enumerate(self._slabs):
                if slab is None:
                    continue
                total = total + Counters(slab.counters())
                gauges[index] = (slab.pid, *slab.gauges())
            return BookSnapshot(total, gauges, list(self._restarts))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slabs, self._slabs = self._slabs, [None] * len(self._slabs)
        for slab in (*slabs, self._own):
            if slab is not None:
                slab.close()
