"""Render results as a fixed-width table or JSON (the same rows either way)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from vfsd.bench.runner import Result

COLUMNS = ("daemon", "workload", "QD", "ops/s", "MB/s", "p50 µs", "p99 µs", "p99.9 µs",
           "daemon µs/op", "(root+rest)", "gen µs/op", "gen CPU", "errors")


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}".replace(",", " ")
    return f"{value:.{digits}f}"


def cpu_split(result: Result) -> str:
    """The daemon's root process vs everything else: vfsd's supervisor + workers."""
    procs = result.daemon_cpu_by_process
    if not procs or not result.ops:
        return "-"
    root = procs[0]["cpu_s"]
    rest = sum(p["cpu_s"] for p in procs[1:])
    return f"{root * 1e6 / result.ops:.1f}+{rest * 1e6 / result.ops:.1f}"


def row(result: Result) -> list[str]:
    lat = result.latency_us
    unit = "" if result.unit == "op" else f" ({result.unit}s)"
    return [result.daemon, result.workload + unit, str(result.queue_depth),
            _num(result.ops_per_s), _num(result.mb_per_s), _num(lat["p50"]),
            _num(lat["p99"]), _num(lat["p99.9"]), _num(result.daemon_cpu_us_per_op),
            cpu_split(result), _num(result.generator_cpu_us_per_op),
            f"{result.generator_cpu_util * 100:.0f}%", str(result.errors)]


def table(results: Iterable[Result]) -> str:
    rows = [list(COLUMNS)] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    left = {0, 1}
    lines = []
    for n, r in enumerate(rows):
        cells = [c.ljust(w) if i in left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def errors_text(results: Iterable[Result]) -> str:
    out = []
    for r in results:
        for sample in r.error_samples:
            out.append(f"{r.daemon} {r.workload} QD{r.queue_depth}: {sample}")
    return "\n".join(out)


def orphans_text(results: Iterable[Result]) -> str:
    """Peak count of the daemon's fds of deleted files, for the runs that sampled it."""
    return "\n".join(f"{r.daemon} {r.workload} QD{r.queue_depth}: {r.extra['deleted_fds_peak']}"
                     for r in results if "deleted_fds_peak" in r.extra)


def to_json(results: Iterable[Result], meta: list[dict[str, Any]]) -> str:
    return json.dumps({"meta": meta, "results": [r.to_dict() for r in results]}, indent=2)
