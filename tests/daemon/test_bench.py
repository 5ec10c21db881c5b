"""`vfsd bench` against real daemons: every workload runs, every reply checks out.

Short runs (0.3 s): these tests prove the bench and the daemon agree on every op, not speed
(no timing assertions). The reference virtiofsd run proves the bench is not vfsd-specific.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.daemon_proc import REPO, Daemon
from vfsd.bench import WORKLOADS, BenchSession, DaemonSpec, Options, run_spawned
from vfsd.bench.daemons import find_virtiofsd

DURATION = 0.3
#: Smaller than the defaults so set-up stays well under a second per daemon.
SMALL = Options(file_size=8 << 20, dir_entries=1000)
RESULT_KEYS = {
    "daemon", "workload", "unit", "queue_depth", "elapsed_s", "ops", "requests", "errors",
    "error_samples", "ops_per_s", "requests_per_s", "mb_per_s", "io_bytes", "latency_us",
    "daemon_cpu_s", "daemon_cpu_us_per_op", "daemon_cpu_by_process", "generator_cpu_s",
    "generator_cpu_us_per_op", "generator_cpu_util", "extra",
}


def check(results, daemon: str, queue_depths: list[int]) -> None:
    assert [(r.workload, r.queue_depth) for r in results] == [
        (w, qd) for w in WORKLOADS for qd in queue_depths]
    for r in results:
        where = f"{daemon} {r.workload} QD{r.queue_depth}"
        assert r.errors == 0, f"{where}: {r.error_samples}"
        assert r.ops > 0 and r.requests >= r.ops, where
        assert r.daemon_cpu_s is not None and r.daemon_cpu_s > 0, where
        assert set(r.latency_us) == {"p50", "p99", "p99.9", "mean", "max"}
        if r.workload.startswith(("read", "write")) and r.workload != "readdir":
            assert r.io_bytes > 0 and r.mb_per_s, where


@pytest.mark.parametrize("workers", [1, 2])
def test_every_workload_against_vfsd(workers):
    results, meta = run_spawned(DaemonSpec("vfsd", workers), list(WORKLOADS), [1, 16],
                                DURATION, SMALL)
    check(results, f"vfsd:{workers}", [1, 16])
    assert meta["max_write"] >= 1 << 20 and meta["read_chunk"] == 1 << 20
    roles = {p["role"] for p in results[0].daemon_cpu_by_process}
    assert roles == {"supervisor", "worker"}
    assert len(results[0].daemon_cpu_by_process) == 1 + workers


def test_bench_over_an_existing_socket(tmp_path):
    """--socket mode: a daemon someone else started, CPU counted through --pid."""
    export = tmp_path / "export"
    export.mkdir()
    daemon = Daemon(tmp_path, export, workers=2)
    try:
        with BenchSession(daemon.socket_path, pid=daemon.proc.pid, label="mine",
                          options=SMALL) as session:
            results = [session.run(w, 4, DURATION) for w in ("getattr", "create", "read1m")]
    finally:
        daemon.stop()
    for r in results:
        assert r.errors == 0 and r.ops > 0, r.error_samples
        assert r.daemon == "mine" and r.daemon_cpu_us_per_op
    # the bench's files stay in the export for the next run
    assert (export / "vfsd-bench" / "data").stat().st_size == SMALL.file_size
    assert list((export / "vfsd-bench" / "create").iterdir()) == []


def test_cli_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vfsd", "bench", "--spawn", "vfsd:2", "--workload", "getattr",
         "lookup", "--queue-depth", "4", "--duration", "0.2", "--json", "--save", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data == json.loads(out.read_text())
    assert [r["workload"] for r in data["results"]] == ["getattr", "lookup"]
    for r in data["results"]:
        assert set(r) == RESULT_KEYS
        assert r["errors"] == 0 and r["ops"] > 0
    assert data["results"][1]["extra"]["forgets"] > 0
    assert data["meta"][0]["daemon"] == "vfsd:2"


def test_cli_table_and_bad_arguments():
    run = [sys.executable, "-m", "vfsd", "bench"]
    proc = subprocess.run([*run, "--spawn", "vfsd", "-w", "read4k", "-q", "2", "-d", "0.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "read4k" in proc.stdout and "ops/s" in proc.stdout
    # Scattered pages: the back-end maps every page on its own, and still answers right.
    proc = subprocess.run([*run, "--spawn", "vfsd:2", "-w", "read1m", "write1m", "-q", "4",
                           "-d", "0.2", "--scatter", "--file-size", "8M"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "read1m" in proc.stdout and "write1m" in proc.stdout
    bad = subprocess.run([*run, "--spawn", "vfsd", "-w", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown workload" in bad.stderr


@pytest.mark.skipif(find_virtiofsd() is None, reason="no reference virtiofsd installed")
def test_every_workload_against_reference_virtiofsd():
    results, meta = run_spawned(DaemonSpec("virtiofsd", 0, find_virtiofsd()), list(WORKLOADS),
                                [16], DURATION, SMALL)
    check(results, "virtiofsd", [16])
    assert meta["write_chunk"] > 0


def test_create_cycle_holds_no_more_deleted_files_than_queue_depth():
    """A forgotten inode's cached O_PATH fd closes when the guest forgets it, in the worker
    that holds it, not at a periodic sweep: under the create cycle (CREATE, RELEASE, UNLINK,
    FORGET) the daemon never holds more fds of deleted files than requests in flight."""
    results, _ = run_spawned(DaemonSpec("vfsd", 2), ["create"], [16], 1.5, SMALL)
    (r,) = results
    assert r.errors == 0 and r.ops > 100
    assert r.extra["deleted_fds_peak"] <= 16, r.extra
