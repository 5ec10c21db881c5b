"""The bench's pure parts: CPU accounting from /proc, spawn specs, percentiles, the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from vfsd.bench.cli import _size
from vfsd.bench.daemons import DaemonSpec
from vfsd.bench.procstat import CpuSampler, descendants, process_cpu
from vfsd.bench.report import table, to_json
from vfsd.bench.runner import Result, latency_summary, memory_for, percentile
from vfsd.bench.workloads import WORKLOADS


def test_process_cpu_sees_this_process_burn_cpu():
    before = process_cpu(os.getpid())
    assert before is not None and before.pid == os.getpid()
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    after = process_cpu(os.getpid())
    assert after is not None
    assert after.cpu_ns - before.cpu_ns >= 20_000_000  # 50 ms burnt, ticks are 10 ms


def test_sampler_includes_children_and_grandchildren():
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            "print(p.pid, flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        tree = descendants(child.pid)
        assert tree[0] == child.pid and grandchild in tree
        sampler = CpuSampler(child.pid)
        snap = sampler.snapshot()
        assert {child.pid, grandchild} <= set(snap)
        rows = sampler.delta({}, snap)
        assert {pid for _role, pid, _cpu in rows} == set(snap)
        assert all(cpu >= 0 for _role, _pid, cpu in rows)
    finally:
        child.kill()
        child.wait()
    assert process_cpu(child.pid) is None  # reaped: gone from /proc


def test_daemon_spec_parse():
    assert DaemonSpec.parse("vfsd", workers=3) == DaemonSpec("vfsd", 3)
    assert DaemonSpec.parse("vfsd:2").threads == 2
    assert DaemonSpec.parse("virtiofsd").threads == 0
    spec = DaemonSpec.parse("virtiofsd:4", virtiofsd="/x")
    assert (spec.threads, spec.binary, spec.label) == (4, "/x", "virtiofsd:4")
    assert DaemonSpec.parse("vfsd:2", vfsd_root="/r").root == "/r"
    assert DaemonSpec.parse("vfsd:0").threads == 0  # vfsd's default: one per CPU it may use
    for bad in ("qemu", "vfsd:x", "vfsd:-1"):
        with pytest.raises(ValueError):
            DaemonSpec.parse(bad)


def test_percentiles_are_nearest_rank():
    values = list(range(1, 1001))
    assert percentile(values, 0.5) == 500
    assert percentile(values, 0.99) == 990
    assert percentile(values, 0.999) == 999
    assert percentile([], 0.5) == 0
    summary = latency_summary([1000, 2000, 3000])
    assert summary == {"p50": 2.0, "p99": 3.0, "p99.9": 3.0, "mean": 2.0, "max": 3.0}


def test_sizes_and_memory():
    assert _size("4096") == 4096 and _size("64M") == 64 << 20 and _size("1g") == 1 << 30
    assert memory_for(16, 1 << 20) % (2 << 20) == 0
    assert memory_for(128, 1 << 20) > 128 << 20


def test_table_and_json_have_every_workload_row():
    rows = [Result(daemon="vfsd:1", workload=name, unit="op", queue_depth=16, elapsed_s=1.0,
                   ops=10, requests=10, errors=0, error_samples=[], ops_per_s=10.0,
                   requests_per_s=10.0, mb_per_s=None, io_bytes=0,
                   latency_us=latency_summary([5000]), daemon_cpu_s=0.001,
                   daemon_cpu_us_per_op=100.0,
                   daemon_cpu_by_process=[{"role": "supervisor", "pid": 1, "cpu_s": 0.0004,
                                           "us_per_op": 40.0},
                                          {"role": "worker", "pid": 2, "cpu_s": 0.0006,
                                           "us_per_op": 60.0}],
                   generator_cpu_s=0.5, generator_cpu_us_per_op=50000.0,
                   generator_cpu_util=0.5)
            for name in WORKLOADS]
    text = table(rows)
    for name in WORKLOADS:
        assert name in text
    assert "40.0+60.0" in text
    assert '"results"' in to_json(rows, [])


def test_summary_medians_ranges_and_ratios(tmp_path):
    from vfsd.bench.summary import load, summarize

    def result(daemon: str, ops: float) -> dict:
        return {"daemon": daemon, "workload": "getattr", "queue_depth": 16, "ops": 1000,
                "ops_per_s": ops, "latency_us": {"p50": 100.0},
                "daemon_cpu_by_process": [{"cpu_s": 0.002}, {"cpu_s": 0.004}],
                "generator_cpu_us_per_op": 3.0}

    files = []
    for i, (mine, ref) in enumerate([(100, 200), (300, 200), (200, 400)]):
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps({"meta": [], "results": [result("vfsd:0", mine),
                                                             result("virtiofsd:0", ref)]}))
        files.append(str(path))
    table = summarize(load(files), "virtiofsd:0")
    row = next(line for line in table.splitlines() if line.startswith("| vfsd:0"))
    assert "200 [100-300]" in row
    assert "0.50x [0.50-1.50]" in row  # per-pass ratios 0.5, 1.5, 0.5
    assert "2.0+4.0" in row
