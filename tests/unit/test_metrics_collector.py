"""The scrape-time collector: exposition parses, values add up, labels stay bounded."""

from __future__ import annotations

import os

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.metrics.fakes import WORKLOAD, FakeSource, spawn_writer, write_workload
from vfsd import __version__
from vfsd.fuse.abi import Opcode
from vfsd.metrics import collector as C
from vfsd.metrics.collector import VfsdCollector, make_registry, read_proc
from vfsd.metrics.slab import (
    BUCKET_BOUNDS_NS,
    ERRNO_LABELS,
    OP_LABELS,
    MetricsBook,
    WorkerMetrics,
)


@pytest.fixture
def book():
    b = MetricsBook(2)
    b.renew(0)
    b.renew(1)
    yield b
    b.close()


def scrape(registry) -> dict:
    """{family name: family} from the text exposition, as Prometheus would read it."""
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families, name, **labels):
    for fam in families.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                yield s


def value(families, name, **labels) -> float:
    found = list(samples(families, name, **labels))
    assert len(found) == 1, f"{name} {labels}: {found}"
    return found[0].value


def populated(book, source):
    """Slot 0 alive (this process), slot 1 dead; a workload written in both slabs."""
    m = WorkerMetrics(book.slab(0))
    m.attach()
    m.set_state(open_handles=3, cached_fds=7)
    write_workload(m, 2)
    write_workload(WorkerMetrics(book.slab(1)), 1)
    source.pids[0] = os.getpid()
    source.ring_depths[:] = [5, 0]
    source.inflight = 6
    source.inodes = 42
    source.guest_memory_bytes = 1 << 30
    return make_registry(book, source)


def test_exposition_parses_and_adds_up(book):
    source = FakeSource(2)
    fams = scrape(populated(book, source))
    n_lookup = 3 * sum(1 for w in WORKLOAD if w[0] == Opcode.LOOKUP)
    assert value(fams, "vfsd_requests_total", op="lookup") == n_lookup
    assert value(fams, "vfsd_request_errors_total", op="lookup", errno="ENOENT") == 3
    assert value(fams, "vfsd_request_errors_total", op="write", errno="ENOSPC") == 3
    assert value(fams, "vfsd_request_errors_total", op="open", errno="EIO") == 3
    assert value(fams, "vfsd_read_bytes_total") == 3 * 4096
    assert value(fams, "vfsd_written_bytes_total") == 3 * 8192
    assert value(fams, "vfsd_inflight_requests") == 6
    assert value(fams, "vfsd_inodes") == 42
    assert value(fams, "vfsd_guest_memory_bytes") == 1 << 30
    assert value(fams, "vfsd_ring_depth", worker="0") == 5
    assert value(fams, "vfsd_worker_up", worker="0") == 1
    assert value(fams, "vfsd_worker_up", worker="1") == 0
    assert value(fams, "vfsd_worker_heartbeat_age_seconds", worker="0") == 0.25
    assert not list(samples(fams, "vfsd_worker_heartbeat_age_seconds", worker="1"))
    # Worker-owned gauges: only live workers whose slab carries their pid.
    assert value(fams, "vfsd_open_handles") == 3
    assert value(fams, "vfsd_cached_fds") == 7
    assert value(fams, "vfsd_worker_restarts_total", worker="0") == 0
    assert value(fams, "vfsd_worker_open_fds", worker="0") > 0
    assert value(fams, "vfsd_worker_max_fds", worker="0") > 0
    assert value(fams, "vfsd_worker_resident_bytes", worker="0") > 1 << 20
    assert value(fams, "vfsd_worker_cpu_seconds_total", worker="0") > 0
    assert not list(samples(fams, "vfsd_worker_open_fds", worker="1"))
    info = fams["vfsd_build_info"].samples[0]
    assert info.name == "vfsd_build_info" and info.labels["version"] == __version__
    assert "process_resident_memory_bytes" in {s.name for f in fams.values() for s in f.samples}


def test_histogram_is_cumulative_with_sum_and_count(book):
    fams = scrape(populated(book, FakeSource(2)))
    buckets = list(samples(fams, "vfsd_request_duration_seconds_bucket", op="write"))
    assert [s.labels["le"] for s in buckets][-1] == "+Inf"
    assert len(buckets) == len(BUCKET_BOUNDS_NS) + 1
    counts = [s.value for s in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    # 3 x WRITE 90 µs (le=1e-04) and 3 x WRITE 30 µs (le=5e-05)
    by_le = {s.labels["le"]: s.value for s in buckets}
    assert by_le["2.5e-05"] == 0 and by_le["5e-05"] == 3 and by_le["0.0001"] == 6
    assert value(fams, "vfsd_request_duration_seconds_count", op="write") == 6
    assert value(fams, "vfsd_request_duration_seconds_sum", op="write") == \
        pytest.approx(3 * (90e-6 + 30e-6))
    assert value(fams, "vfsd_requests_total", op="write") == 6


def test_families_match_the_declared_list(book):
    fams = scrape(populated(book, FakeSource(2)))
    ours = {name for name in fams if name.startswith("vfsd_")}
    assert ours == set(C.FAMILIES)


def test_empty_daemon_exports_every_family_without_errors():
    book = MetricsBook(1)
    try:
        book.renew(0)
        fams = scrape(make_registry(book, FakeSource(1), process=False))
        assert {n for n in fams if n.startswith("vfsd_")} == set(C.FAMILIES)
        assert not list(samples(fams, "vfsd_requests_total"))
        assert value(fams, "vfsd_worker_restarts_total", worker="0") == 0
    finally:
        book.close()


def test_label_cardinality_is_bounded(book):
    """Even with every opcode (and some that do not exist) failing with every errno, the
    label sets stay within op names x errno names x worker slots."""
    m = WorkerMetrics(book.slab(0))
    for op in range(0, 300):
        for err in range(0, 140):
            m.record(op, err, op * 1000)
    source = FakeSource(2)
    source.pids[:] = [os.getpid(), os.getpid()]
    fams = scrape(make_registry(book, source, process=False))
    ops = {s.labels["op"] for s in samples(fams, "vfsd_requests_total")}
    assert ops <= set(OP_LABELS) and len(ops) == len(set(OP_LABELS))
    errnos = {s.labels["errno"] for s in samples(fams, "vfsd_request_errors_total")}
    assert errnos == set(ERRNO_LABELS)
    assert len(list(samples(fams, "vfsd_request_errors_total"))) <= len(set(OP_LABELS)) * len(
        ERRNO_LABELS)
    workers = {s.labels["worker"] for f in fams.values() for s in f.samples if "worker" in s.labels}
    assert workers == {"0", "1"}
    per_op = 1 + (len(BUCKET_BOUNDS_NS) + 3) + len(ERRNO_LABELS)  # total, histogram, errors
    total = sum(len(f.samples) for f in fams.values() if f.name.startswith("vfsd_"))
    assert total <= len(set(OP_LABELS)) * per_op + 100, total


def test_counters_survive_a_worker_restart(book):
    """Respawn: the old slab is folded, the new one starts at zero, nothing goes backwards."""
    source = FakeSource(2)
    registry = populated(book, source)
    before = scrape(registry)
    book.renew(0)  # slot 0 restarted
    after = scrape(registry)
    for name in ("vfsd_requests_total", "vfsd_request_errors_total", "vfsd_read_bytes_total",
                 "vfsd_request_duration_seconds_bucket", "vfsd_request_duration_seconds_sum"):
        old = {tuple(sorted(s.labels.items())): s.value for s in samples(before, name)}
        new = {tuple(sorted(s.labels.items())): s.value for s in samples(after, name)}
        assert new == old, name
    assert value(after, "vfsd_worker_restarts_total", worker="0") == 1
    assert value(after, "vfsd_open_handles") == 0  # the new slab has no writer yet


def test_forked_worker_slab_is_scraped(book):
    source = FakeSource(2)
    proc = spawn_writer(book.slab(1), rounds=10, handles=2, cached=4, period=60)
    try:
        source.pids[1] = proc.pid
        registry = make_registry(book, source, process=False)
        for _ in range(200):
            fams = scrape(registry)
            if list(samples(fams, "vfsd_requests_total", op="lookup")):
                break
        assert value(fams, "vfsd_requests_total", op="lookup") == 20
        assert value(fams, "vfsd_open_handles") == 2
        assert value(fams, "vfsd_worker_resident_bytes", worker="1") > 0
    finally:
        proc.kill()
        proc.join(5)


def test_worker_cpu_never_goes_backwards_across_pids(book, monkeypatch):
    cpu = {100: 5.0, 200: 1.0}
    monkeypatch.setattr(C, "read_proc", lambda pid: C.ProcStats(cpu[pid], 1, 1, 1024)
                        if pid in cpu else None)
    source = FakeSource(1)
    collector = VfsdCollector(book, source)

    def cpu_of() -> float:
        fam = next(f for f in collector.collect() if f.name == "vfsd_worker_cpu_seconds")
        return fam.samples[0].value

    source.pids[0] = 100
    assert cpu_of() == 5.0
    source.pids[0] = None  # died
    assert cpu_of() == 5.0
    source.pids[0] = 200  # respawned
    assert cpu_of() == 6.0
    cpu[200] = 2.5
    assert cpu_of() == 7.5


def test_read_proc_of_self_and_of_a_gone_pid():
    stats = read_proc(os.getpid())
    assert stats is not None
    assert stats.open_fds == len(os.listdir("/proc/self/fd")) - 1 or stats.open_fds > 0
    assert stats.resident_bytes > 0 and stats.cpu_seconds >= 0
    assert read_proc(2**22 + 12345) is None
