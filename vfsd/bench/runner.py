"""Run workloads against a back-end and turn the counts into a `Result` (the JSON schema).

Why CPU is measured on both sides: on a 2-core machine the front-end and the daemon share
the CPUs, so ops/s alone cannot say who is the bottleneck. `daemon_cpu_us_per_op` is the
daemon's CPU (all processes and threads, from /proc) divided by ops; `generator_cpu_util`
near 1.0 means this process saturated its core and the daemon may be faster than shown.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vfsd.bench.daemons import DaemonSpec, SpawnedDaemon
from vfsd.bench.engine import Engine
from vfsd.bench.procstat import CpuSampler, OrphanWatch
from vfsd.bench.workloads import WORKLOADS, Context, MiB, Options
from vfsd.frontend.fuse_client import FuseClient, InitReply, VhostTransport, parse_init
from vfsd.frontend.vhost_client import VhostUserClient

QUEUE_SIZE = 1024  # 1 MiB in 4 KiB pages is 256+ descriptors in one (indirect) chain


@dataclass
class Result:
    """One (daemon, workload, queue depth) run; `asdict` of it is the JSON row."""

    daemon: str
    workload: str
    unit: str
    queue_depth: int
    elapsed_s: float
    ops: int
    requests: int
    errors: int
    error_samples: list[str]
    ops_per_s: float
    requests_per_s: float
    mb_per_s: float | None
    io_bytes: int
    latency_us: dict[str, float]
    daemon_cpu_s: float | None
    daemon_cpu_us_per_op: float | None
    daemon_cpu_by_process: list[dict[str, Any]]
    generator_cpu_s: float
    generator_cpu_us_per_op: float | None
    generator_cpu_util: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 if empty)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_ns: list[int]) -> dict[str, float]:
    values = sorted(latencies_ns)
    us = 1e-3
    mean = sum(values) / len(values) if values else 0.0
    return {"p50": round(percentile(values, 0.50) * us, 1),
            "p99": round(percentile(values, 0.99) * us, 1),
            "p99.9": round(percentile(values, 0.999) * us, 1),
            "mean": round(mean * us, 1),
            "max": round((values[-1] if values else 0) * us, 1)}


def memory_for(max_queue_depth: int, io_size: int) -> int:
    """Guest RAM for the slots of the largest run plus set-up traffic (8 x 1 MiB WRITEs)."""
    need = 48 * MiB + max_queue_depth * (io_size + 64 * 1024)
    return -(-need // (2 * MiB)) * (2 * MiB)


class BenchSession:
    """One connection to a back-end: vhost-user handshake, FUSE INIT, the bench directory."""

    def __init__(self, socket_path: str, *, pid: int | None = None, label: str = "backend",
                 options: Options | None = None, max_queue_depth: int = 16,
                 queue_size: int = QUEUE_SIZE, segment: int = 4096, scatter: bool = False,
                 timeout: float = 10.0) -> None:
        self.label = label
        self.options = options or Options()
        self.sampler = CpuSampler(pid) if pid else None
        mem = memory_for(max_queue_depth, self.options.io_size)
        self.client = VhostUserClient.connect(socket_path, num_queues=2, queue_size=queue_size,
                                              mem_size=mem, timeout=timeout)
        try:
            self.client.realize()
            self.client.start()
            self.transport = VhostTransport(self.client, timeout=timeout)
            self.init: InitReply = parse_init(FuseClient(self.transport).init())
            self.engine = Engine(self.client, segment=segment, scatter=scatter,
                                 stall_timeout=timeout)
            self.ctx = Context(self.transport, self.engine, self.init, self.options)
        except BaseException:
            self.client.close()
            raise

    def run(self, workload: str, queue_depth: int, duration: float) -> Result:
        """Set up `workload`, drive it for `duration` s at `queue_depth`, tear it down."""
        wl = WORKLOADS[workload](self.ctx)
        wl.setup()
        in_data, out_body = wl.slot_sizes()
        slots = self.engine.make_slots(queue_depth, in_data=in_data, out_body=out_body)
        watch = OrphanWatch(self.sampler.root) if self.sampler and wl.watch_orphans else None
        try:
            before = self.sampler.snapshot() if self.sampler else None
            g0 = time.process_time()
            if watch is not None:
                with watch:
                    stats = self.engine.run(wl, slots, duration)
            else:
                stats = self.engine.run(wl, slots, duration)
            g1 = time.process_time() - (watch.cpu_s if watch is not None else 0.0)
            after = self.sampler.snapshot() if self.sampler else None
        finally:
            self.engine.free_slots(slots)
        wl.teardown()
        secs = stats.elapsed_ns / 1e9 or 1e-9
        ops = stats.ops

        def per_op(seconds: float) -> float | None:
            return round(seconds * 1e6 / ops, 2) if ops else None

        by_process: list[dict[str, Any]] = []
        daemon_cpu = None
        if self.sampler and before is not None and after is not None:
            for role, pid, cpu in self.sampler.delta(before, after):
                by_process.append({"role": role, "pid": pid, "cpu_s": round(cpu, 4),
                                   "us_per_op": per_op(cpu)})
            daemon_cpu = sum(p["cpu_s"] for p in by_process)
        gen = g1 - g0
        io = stats.io_bytes
        return Result(
            daemon=self.label, workload=workload, unit=wl.unit, queue_depth=queue_depth,
            elapsed_s=round(secs, 4), ops=ops, requests=stats.requests, errors=stats.errors,
            error_samples=stats.error_samples, ops_per_s=round(ops / secs, 1),
            requests_per_s=round(stats.requests / secs, 1),
            mb_per_s=round(io / secs / 1e6, 1) if io else None, io_bytes=io,
            latency_us=latency_summary(stats.latencies_ns),
            daemon_cpu_s=round(daemon_cpu, 4) if daemon_cpu is not None else None,
            daemon_cpu_us_per_op=per_op(daemon_cpu) if daemon_cpu is not None else None,
            daemon_cpu_by_process=by_process, generator_cpu_s=round(gen, 4),
            generator_cpu_us_per_op=per_op(gen), generator_cpu_util=round(gen / secs, 3),
            extra={**wl.extra(stats),
                   **({"deleted_fds_peak": watch.peak} if watch is not None else {}),
                   "kicks_per_request": round(stats.kicks / (stats.requests or 1), 3),
                   "interrupts_per_request": round(stats.interrupts / (stats.requests or 1), 3)},
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> BenchSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_matrix(session: BenchSession, workloads: list[str], queue_depths: list[int],
               duration: float, progress: Any = None) -> list[Result]:
    results = []
    for name in workloads:
        for qd in queue_depths:
            result = session.run(name, qd, duration)
            if progress is not None:
                progress(result)
            results.append(result)
    return results


def run_spawned(spec: DaemonSpec, workloads: list[str], queue_depths: list[int],
                duration: float, options: Options | None = None, progress: Any = None,
                spawn_kw: dict[str, Any] | None = None, **session_kw: Any
                ) -> tuple[list[Result], dict[str, Any]]:
    """Start `spec` on a temporary export, run the matrix, stop it; returns (results, meta)."""
    with SpawnedDaemon(spec, **(spawn_kw or {})) as daemon:
        try:
            with BenchSession(daemon.socket_path, pid=daemon.pid, label=spec.label,
                              options=options, max_queue_depth=max(queue_depths),
                              **session_kw) as session:
                meta = session_meta(session)
                meta["argv"] = daemon.argv
                meta["export"] = str(daemon.export)
                return run_matrix(session, workloads, queue_depths, duration, progress), meta
        except BaseException as e:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"{spec.label} died (rc={daemon.proc.returncode}):\n"
                                   f"{daemon.log()[-3000:]}") from e
            raise


def session_meta(session: BenchSession) -> dict[str, Any]:
    init = session.init
    return {"daemon": session.label, "fuse": f"{init.major}.{init.minor}",
            "max_write": init.max_write, "max_pages": init.max_pages,
            "read_chunk": session.ctx.read_chunk, "write_chunk": session.ctx.write_chunk,
            "queue_size": session.client.queue_size}
