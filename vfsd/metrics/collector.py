"""The scrape-time collector: worker slabs + supervisor state -> `vfsd_*` metric families.

A prometheus-client custom collector (client_python `docs/content/collector/custom.md`):
`collect()` builds fresh families on every scrape from

- the `MetricsBook` (per-worker slabs, the supervisor's own slab, retired totals;
  `vfsd/metrics/slab.py`): request counts, errors, latency histograms, bytes, the
  worker-owned gauges (open handles, cached fds), and the restart counts;
- a `MetricsSource` the supervisor implements (the protocol below): worker pids, ring depths,
  in-flight requests, live inodes, guest memory size;
- `/proc/<pid>` of each live worker: CPU seconds, resident bytes, open and max fds.

Aggregation (STYLE.md §5: each metric declares it):

| metric | type | labels | aggregation |
|---|---|---|---|
| vfsd_requests_total | counter | op | sum of all slabs (workers, supervisor) + retired |
| vfsd_request_errors_total | counter | op, errno | sum of all slabs + retired |
| vfsd_request_duration_seconds | histogram | op | buckets summed, then cumulative |
| vfsd_read_bytes_total, vfsd_written_bytes_total | counter | - | sum of all slabs + retired |
| vfsd_inflight_requests | gauge | - | from the source (supervisor's view) |
| vfsd_ring_depth | gauge | worker | per worker, from the source |
| vfsd_worker_up | gauge | worker | 1 while the slot has a live process |
| vfsd_worker_heartbeat_age_seconds | gauge | worker | per live worker (if the source has it) |
| vfsd_worker_restarts_total | counter | worker | per slot, from the book |
| vfsd_worker_cpu_seconds_total | counter | worker | /proc; dead incarnations folded in |
| vfsd_worker_resident_bytes, vfsd_worker_open_fds, vfsd_worker_max_fds | gauge | worker | /proc |
| vfsd_inodes, vfsd_guest_memory_bytes | gauge | - | from the source |
| vfsd_open_handles, vfsd_cached_fds | gauge | - | sum over live workers' slabs |
| vfsd_build_info | gauge (info) | version, python | constant 1 |

Only op / (op, errno) pairs that were ever seen are exported; once exported a series never
disappears (retired totals keep it), so rates stay continuous. Label sets are bounded: `op`
takes the FUSE opcode names plus "unknown", `errno` the names in `slab.ERRNO_NAMES` plus
"other", `worker` the slot indexes.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from vfsd import __version__
from vfsd.metrics.slab import (
    BUCKET_BOUNDS_NS,
    ERRNO_LABELS,
    N_BUCKETS,
    N_ERRNO,
    OP_LABELS,
    OP_SLOTS,
    MetricsBook,
    cumulative,
)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_LE = (*(floatToGoString(b / 1e9) for b in BUCKET_BOUNDS_NS), "+Inf")

#: Every metric family as the text exposition names it; histogram and counter
#: samples add `_bucket/_sum/_count` and `_total`.
FAMILIES = (
    "vfsd_requests", "vfsd_request_errors", "vfsd_request_duration_seconds",
    "vfsd_read_bytes", "vfsd_written_bytes", "vfsd_inflight_requests", "vfsd_ring_depth",
    "vfsd_worker_up", "vfsd_worker_heartbeat_age_seconds", "vfsd_worker_restarts",
    "vfsd_worker_cpu_seconds", "vfsd_worker_resident_bytes", "vfsd_worker_open_fds",
    "vfsd_worker_max_fds", "vfsd_inodes", "vfsd_guest_memory_bytes", "vfsd_open_handles",
    "vfsd_cached_fds", "vfsd_build_info",
)


# ------------------------------------------------------------------------------ the source
@dataclass(frozen=True, slots=True)
class WorkerState:
    """One worker slot as the supervisor sees it at scrape time."""

    index: int  # slot index, 0..N-1; exported as the `worker` label
    pid: int | None  # the slot's live process, None while it has none (dead, not respawned)
    ring_depth: int  # records in the slot's request ring not yet popped by the worker
    heartbeat_age: float | None = None  # s since the worker's last loop turn; None = unknown


@dataclass(frozen=True, slots=True)
class DaemonState:
    """What the supervisor holds that the slabs do not."""

    workers: Sequence[WorkerState]  # one per slot, any order
    inflight: int  # requests routed to workers and not completed yet (all slots)
    inodes: int  # live entries in the shared inode table, root included
    guest_memory_bytes: int  # sum of the mapped guest memory regions' sizes; 0 before any


class MetricsSource(Protocol):
    """Implemented by the supervisor.

    `metrics_state()` is called from the metrics HTTP thread, once per scrape, while the
    supervisor's main thread runs: it must only read (no locks the main thread may hold, no
    syscalls that block, no mutation) and return quickly. Reading `len(dict)`, list items and
    shared-memory words is safe under the GIL.
    """

    def metrics_state(self) -> DaemonState: ...


# ------------------------------------------------------------------------------ /proc
@dataclass(frozen=True, slots=True)
class ProcStats:
    cpu_seconds: float
    resident_bytes: int
    open_fds: int
    max_fds: int | None


def read_proc(pid: int) -> ProcStats | None:
    """CPU (user+system), RSS, open fds and the soft RLIMIT_NOFILE of `pid`; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read().split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/limits", "rb") as f:
            limits = f.read().splitlines()
    except OSError:  # the process died (or was reaped) under us
        return None
    # "pid (comm) state ppid ..." - comm may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(b")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
    max_fds = None
    for line in limits:
        if line.startswith(b"Max open files"):
            soft = line[len(b"Max open files"):].split()[0]
            max_fds = None if soft == b"unlimited" else int(soft)
    return ProcStats(cpu, int(statm[1]) * _PAGE, fds, max_fds)


# ------------------------------------------------------------------------------ the collector
class VfsdCollector(Collector):
    def __init__(self, book: MetricsBook, source: MetricsSource, *,
                 version: str = __version__) -> None:
        self.book = book
        self.source = source
        self.version = version
        self._lock = threading.Lock()  # two scrapes at once must not double-fold CPU time
        self._cpu_seen: dict[int, tuple[int, float]] = {}  # slot -> (pid, last cpu seconds)
        self._cpu_retired: dict[int, float] = {}  # slot -> cpu seconds of dead incarnations

    def collect(self) -> Iterator[Metric]:
        state = self.source.metrics_state()
        snap = self.book.snapshot()
        yield from self._requests(snap.counters)
        yield from self._workers(state, snap.restarts, snap.gauges)

        c = CounterMetricFamily("vfsd_read_bytes", "Bytes the guest read (READ replies).")
        c.add_metric([], snap.counters.bytes_read)
        yield c
        c = CounterMetricFamily("vfsd_written_bytes", "Bytes the guest wrote (WRITE payloads).")
        c.add_metric([], snap.counters.bytes_written)
        yield c
        yield GaugeMetricFamily("vfsd_inflight_requests",
                                "Requests routed to workers and not yet completed.",
                                value=state.inflight)
        yield GaugeMetricFamily("vfsd_inodes", "Live entries in the shared inode table.",
                                value=state.inodes)
        yield GaugeMetricFamily("vfsd_guest_memory_bytes",
                                "Guest memory mapped (sum of the memory table's regions).",
                                value=state.guest_memory_bytes)
        yield InfoMetricFamily("vfsd_build", "vfsd build information.",
                               value={"version": self.version,
                                      "python": platform.python_version()})

    def _requests(self, counters) -> Iterator[Metric]:
        # Merge op slots by label ("unknown" covers several slots).
        per_op: dict[str, tuple[list[int], int, list[int]]] = {}
        for op in range(OP_SLOTS):
            buckets = counters.buckets(op)
            errors = counters.errors(op)
            if not any(buckets) and not any(errors):
                continue
            label = OP_LABELS[op]
            if label in per_op:
                b0, s0, e0 = per_op[label]
                buckets = [x + y for x, y in zip(b0, buckets, strict=True)]
                errors = [x + y for x, y in zip(e0, errors, strict=True)]
                per_op[label] = (buckets, s0 + counters.latency_sum_ns(op), errors)
            else:
                per_op[label] = (buckets, counters.latency_sum_ns(op), errors)

        requests = CounterMetricFamily("vfsd_requests", "FUSE requests served, by opcode.",
                                       labels=["op"])
        errors_f = CounterMetricFamily(
            "vfsd_request_errors", "FUSE requests answered with an error, by opcode and errno.",
            labels=["op", "errno"])
        hist = HistogramMetricFamily(
            "vfsd_request_duration_seconds",
            "Time a worker spent on a request (decode, file system op, reply), by opcode.",
            labels=["op"])
        for label in sorted(per_op):
            buckets, sum_ns, errors = per_op[label]
            cum = cumulative(buckets)
            requests.add_metric([label], cum[-1])
            hist.add_metric([label], list(zip(_LE, cum, strict=True)), sum_ns / 1e9)
            for e in range(N_ERRNO):
                if errors[e]:
                    errors_f.add_metric([label, ERRNO_LABELS[e]], errors[e])
        yield requests
        yield errors_f
        yield hist

    def _workers(self, state: DaemonState, restarts: list[int],
                 gauges: dict[int, tuple[int, int, int]]) -> Iterator[Metric]:
        lab = ["worker"]
        up = GaugeMetricFamily("vfsd_worker_up", "1 while the worker slot has a live process.",
                               labels=lab)
        depth = GaugeMetricFamily("vfsd_ring_depth",
                                  "Requests waiting in the worker's request ring.", labels=lab)
        age = GaugeMetricFamily("vfsd_worker_heartbeat_age_seconds",
                                "Seconds since the worker's last loop turn.", labels=lab)
        restarts_f = CounterMetricFamily("vfsd_worker_restarts",
                                         "Times the worker slot was respawned.", labels=lab)
        cpu = CounterMetricFamily("vfsd_worker_cpu_seconds",
                                  "CPU time (user + system) of the worker slot's processes.",
                                  labels=lab)
        rss = GaugeMetricFamily("vfsd_worker_resident_bytes", "Worker resident memory.",
                                labels=lab)
        fds = GaugeMetricFamily("vfsd_worker_open_fds", "Open file descriptors of the worker.",
                                labels=lab)
        max_fds = GaugeMetricFamily("vfsd_worker_max_fds",
                                    "The worker's soft RLIMIT_NOFILE.", labels=lab)
        handles = cached = 0
        seen: set[int] = set()
        with self._lock:
            for w in sorted(state.workers, key=lambda w: w.index):
                worker = [str(w.index)]
                seen.add(w.index)
                up.add_metric(worker, 1 if w.pid is not None else 0)
                depth.add_metric(worker, w.ring_depth)
                if w.pid is not None and w.heartbeat_age is not None:
                    age.add_metric(worker, w.heartbeat_age)
                restarts_f.add_metric(worker, restarts[w.index] if w.index < len(restarts)
                                      else 0)
                stats = read_proc(w.pid) if w.pid is not None else None
                cpu.add_metric(worker, self._cpu_total(w.index, w.pid, stats))
                if stats is not None:
                    rss.add_metric(worker, stats.resident_bytes)
                    fds.add_metric(worker, stats.open_fds)
                    if stats.max_fds is not None:
                        max_fds.add_metric(worker, stats.max_fds)
                g = gauges.get(w.index)
                if w.pid is not None and g is not None and g[0] == w.pid:
                    handles += g[1]
                    cached += g[2]
        for index, n in enumerate(restarts):  # slots the source no longer lists
            if index not in seen:
                restarts_f.add_metric([str(index)], n)
        yield from (up, depth, age, restarts_f, cpu, rss, fds, max_fds)
        yield GaugeMetricFamily("vfsd_open_handles",
                                "File and directory handles the guest holds open.",
                                value=handles)
        yield GaugeMetricFamily("vfsd_cached_fds", "O_PATH inode fds cached by the workers.",
                                value=cached)

    def _cpu_total(self, index: int, pid: int | None, stats: ProcStats | None) -> float:
        """Monotonic CPU seconds of a slot: a new pid folds the last value seen of the old one
        in (CPU burnt between that scrape and the old process's death is not counted)."""
        retired = self._cpu_retired.get(index, 0.0)
        seen = self._cpu_seen.get(index)
        if seen is not None and seen[0] != pid:
            retired += seen[1]
            self._cpu_retired[index] = retired
            del self._cpu_seen[index]
            seen = None
        if pid is None or stats is None:
            return retired + (seen[1] if seen is not None else 0.0)
        self._cpu_seen[index] = (pid, stats.cpu_seconds)
        return retired + stats.cpu_seconds


def make_registry(book: MetricsBook, source: MetricsSource, *,
                  process: bool = True) -> CollectorRegistry:
    """A registry with the vfsd collector (and the supervisor's own `process_*` metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VfsdCollector(book, source))
    if process:
        ProcessCollector(registry=registry)
    return registry


assert len(_LE) == N_BUCKETS
