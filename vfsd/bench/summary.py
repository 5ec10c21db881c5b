"""Medians and ranges over several saved `vfsd bench --save` passes, vfsd against a reference.

    python -m vfsd.bench.summary --reference virtiofsd:0 pass1.json pass2.json ...

One row per (daemon, workload, queue depth): median ops/s [min-max], the ratio to the
reference's median in the same passes (with the range of per-pass ratios), p50 latency, the
daemon's CPU per op split root+rest, and the generator's CPU per op (a bench change that
slows the generator caps the reference too, so it is shown next to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from typing import Any

Key = tuple[str, str, int]  # daemon, workload, queue depth


def load(paths: list[str]) -> list[dict[Key, dict[str, Any]]]:
    """One {key: result} per pass file."""
    passes = []
    for path in paths:
        with open(path) as f:
            results = json.load(f)["results"]
        passes.append({(r["daemon"], r["workload"], r["queue_depth"]): r for r in results})
    return passes


def _split(r: dict[str, Any]) -> tuple[float, float]:
    procs = r["daemon_cpu_by_process"]
    ops = r["ops"] or 1
    root = procs[0]["cpu_s"] * 1e6 / ops if procs else 0.0
    rest = sum(p["cpu_s"] for p in procs[1:]) * 1e6 / ops
    return root, rest


def _fmt(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    return f"{med:,.{digits}f} [{min(values):,.{digits}f}-{max(values):,.{digits}f}]"


def summarize(passes: list[dict[Key, dict[str, Any]]], reference: str) -> str:
    keys = sorted({k for p in passes for k in p}, key=lambda k: (k[1], k[2], k[0] != reference,
                                                                  k[0]))
    lines = ["| daemon | workload | QD | ops/s median [range] | ÷ reference [range] | "
             "p50 µs | daemon µs/op root+rest | gen µs/op |",
             "|---|---|---|---|---|---|---|---|"]
    by_key: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for p in passes:
        for k, r in p.items():
            by_key[k].append(r)
    for key in keys:
        daemon, workload, qd = key
        rows = by_key[key]
        ops = [r["ops_per_s"] for r in rows]
        ratios = []
        for p in passes:
            mine, ref = p.get(key), p.get((reference, workload, qd))
            if mine is not None and ref is not None and ref["ops_per_s"]:
                ratios.append(mine["ops_per_s"] / ref["ops_per_s"])
        ratio = (f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
                 if ratios and daemon != reference else "")
        split = [_split(r) for r in rows]
        root = statistics.median(s[0] for s in split)
        rest = statistics.median(s[1] for s in split)
        gen = [r["generator_cpu_us_per_op"] or 0.0 for r in rows]
        p50 = [r["latency_us"]["p50"] for r in rows]
        lines.append(f"| {daemon} | {workload} | {qd} | {_fmt(ops)} | {ratio} | "
                     f"{statistics.median(p50):.0f} | {root:.1f}+{rest:.1f} | "
                     f"{statistics.median(gen):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vfsd.bench.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default="virtiofsd:0", help="daemon label to compare with")
    p.add_argument("files", nargs="+", help="JSON files written by vfsd bench --save")
    args = p.parse_args(argv)
    print(summarize(load(args.files), args.reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
