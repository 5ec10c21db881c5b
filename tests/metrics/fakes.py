"""A stand-in for the supervisor's `MetricsSource` and a worker writing its slab (tests)."""

from __future__ import annotations

import os
import time

import multiprocess

from vfsd.fuse.abi import Opcode
from vfsd.metrics.collector import DaemonState, WorkerState
from vfsd.metrics.slab import BufferedWorkerMetrics, Slab, WorkerMetrics

_fork = multiprocess.get_context("fork")


class FakeSource:
    """Mutable supervisor state: tests set pids, depths, inodes... and the collector reads."""

    def __init__(self, workers: int = 2) -> None:
        self.pids: list[int | None] = [None] * workers
        self.ring_depths = [0] * workers
        self.heartbeat_age: float | None = 0.25
        self.inflight = 0
        self.inodes = 1
        self.guest_memory_bytes = 0

    def metrics_state(self) -> DaemonState:
        return DaemonState(
            workers=[WorkerState(i, pid, self.ring_depths[i],
                                 self.heartbeat_age if pid is not None else None)
                     for i, pid in enumerate(self.pids)],
            inflight=self.inflight,
            inodes=self.inodes,
            guest_memory_bytes=self.guest_memory_bytes,
        )


#: A little of everything, so every vfsd_* family has samples: (opcode, errno, latency ns,
#: bytes read, bytes written).
WORKLOAD = (
    (Opcode.LOOKUP, 0, 15_000, 0, 0),
    (Opcode.LOOKUP, 2, 9_000, 0, 0),  # ENOENT
    (Opcode.GETATTR, 0, 7_000, 0, 0),
    (Opcode.READ, 0, 40_000, 4096, 0),
    (Opcode.WRITE, 0, 90_000, 0, 8192),
    (Opcode.WRITE, 28, 30_000, 0, 0),  # ENOSPC
    (Opcode.FSYNC, 0, 3_000_000, 0, 0),
    (Opcode.OPEN, 5, 20_000, 0, 0),  # EIO
)


def write_workload(metrics: WorkerMetrics, rounds: int = 1) -> None:
    for _ in range(rounds):
        for op, err, lat, nread, nwritten in WORKLOAD:
            metrics.record(op, err, lat, nread, nwritten)


def _child(slab: Slab, rounds: int, handles: int, cached: int, period: float,
           buffered: bool) -> None:
    metrics = BufferedWorkerMetrics(slab) if buffered else WorkerMetrics(slab)
    metrics.attach()
    metrics.set_state(handles, cached)
    if period <= 0:
        write_workload(metrics, rounds)
        metrics.flush()
        os._exit(0)
    while True:  # until killed: a steady request stream, as a worker's loop turns
        write_workload(metrics, rounds)
        metrics.maybe_flush(time.monotonic_ns())
        time.sleep(period)


def spawn_writer(slab: Slab, *, rounds: int = 1, handles: int = 3, cached: int = 7,
                 period: float = 0.0, buffered: bool = False) -> multiprocess.Process:
    """Fork a 'worker' that writes the slab the way a vfsd worker does. period=0: write
    `rounds` x WORKLOAD once and exit; period>0: keep writing every `period` s until killed.
    `buffered`: through BufferedWorkerMetrics (published every 100 ms) instead of directly."""
    proc = _fork.Process(target=_child, args=(slab, rounds, handles, cached, period, buffered),
                         daemon=True)
    proc.start()
    return proc
