"""Metrics slabs: layout, bucket math, single-writer counters across a fork, retired totals."""

from __future__ import annotations

import errno
import os
import random
import time
import timeit

import pytest

from tests.metrics.fakes import WORKLOAD, spawn_writer, write_workload
from vfsd.fuse.abi import Opcode
from vfsd.metrics import slab as S
from vfsd.metrics.slab import (
    BUCKET_BOUNDS_NS,
    ERRNO_INDEX,
    ERRNO_OTHER,
    N_BUCKETS,
    Counters,
    MetricsBook,
    Slab,
    WorkerMetrics,
    bucket_of,
    cumulative,
)


@pytest.fixture
def slab():
    s = Slab("test")
    yield s
    s.close()


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


# ----------------------------------------------------------------------------- layout
def test_layout_regions_do_not_overlap():
    assert S.W_PID < S.G_OPEN_HANDLES < S.G_CACHED_FDS < S.COUNTER_BASE
    assert S.C_READ_BYTES >= S.COUNTER_BASE and S.C_WRITTEN_BYTES < S.SUM_BASE
    assert S.SUM_BASE + S.OP_SLOTS == S.HIST_BASE
    assert S.HIST_BASE + S.OP_SLOTS * N_BUCKETS == S.ERR_BASE
    assert S.ERR_BASE + S.OP_SLOTS * S.N_ERRNO == S.WORDS
    assert S.WORDS * 8 <= S.SLAB_BYTES


def test_slab_is_unlinked_and_stamped(slab):
    assert not any("-mtest-" in n for n in shm_names())
    assert slab.words[S.W_MAGIC] == S.MAGIC
    assert slab.words[S.W_LAYOUT] == S.LAYOUT
    assert slab.counters() == [0] * S.N_COUNTERS
    assert slab.pid == 0


def test_buckets_are_10us_to_10s_in_1_2_5_steps():
    assert BUCKET_BOUNDS_NS[0] == 10_000 and BUCKET_BOUNDS_NS[-1] == 10_000_000_000
    assert len(BUCKET_BOUNDS_NS) == 19 and N_BUCKETS == 20
    mantissas = {b // 10 ** (len(str(b)) - 1) for b in BUCKET_BOUNDS_NS}
    assert mantissas == {1, 2, 5}


@pytest.mark.parametrize("latency, bucket", [
    (0, 0), (1, 0), (9_999, 0), (10_000, 0),  # le="1e-05" includes 10 µs itself
    (10_001, 1), (25_000, 1), (25_001, 2), (1_000_000_000, 15),
    (10_000_000_000, 18), (10_000_000_001, 19), (1 << 62, 19),  # +Inf
])
def test_bucket_of_follows_le_semantics(latency, bucket):
    assert bucket_of(latency) == bucket


def test_record_buckets_agree_with_bisect(slab):
    """The fast bit_length lookup in record() and bisect agree on every boundary and at random."""
    m = WorkerMetrics(slab)
    rng = random.Random(6)
    values = [v + d for v in (0, *BUCKET_BOUNDS_NS) for d in (-1, 0, 1) if v + d >= 0]
    values += [rng.randrange(1 << rng.randrange(1, 40)) for _ in range(5000)]
    expected = [0] * N_BUCKETS
    for v in values:
        m.record(Opcode.GETATTR, 0, v)
        expected[bucket_of(v)] += 1
    c = Counters(slab.counters())
    assert c.buckets(Opcode.GETATTR) == expected
    assert c.latency_sum_ns(Opcode.GETATTR) == sum(values)
    assert c.count(Opcode.GETATTR) == len(values)


def test_cumulative_buckets():
    assert cumulative([1, 0, 2, 0, 3]) == [1, 1, 3, 3, 6]


# ----------------------------------------------------------------------------- the writer
def test_record_counts_errors_bytes_and_gauges(slab):
    m = WorkerMetrics(slab)
    m.attach()
    m.record(Opcode.LOOKUP, errno.ENOENT, 12_000)
    m.record(Opcode.LOOKUP, -errno.ENOENT, 12_000)  # fuse_out_header sign
    m.record(Opcode.LOOKUP, 0, 5_000)
    m.record(Opcode.READ, 0, 30_000, bytes_read=4096)
    m.record(Opcode.WRITE, 0, 30_000, bytes_written=100)
    m.record(Opcode.WRITE, 9999, 30_000)  # an errno not in the list
    m.record(Opcode.CUSE_INIT, 0, 1)  # opcode >= 64: slot 0
    m.record(200_000, errno.EIO, 1)
    m.set_state(open_handles=4, cached_fds=11)
    c = Counters(slab.counters())
    assert c.count(Opcode.LOOKUP) == 3
    assert c.errors(Opcode.LOOKUP)[ERRNO_INDEX[errno.ENOENT]] == 2
    assert sum(c.errors(Opcode.LOOKUP)) == 2
    assert c.errors(Opcode.WRITE)[ERRNO_OTHER] == 1
    assert c.bytes_read == 4096 and c.bytes_written == 100
    assert c.count(0) == 2 and c.errors(0)[ERRNO_INDEX[errno.EIO]] == 1
    assert slab.pid == os.getpid()
    assert slab.gauges() == (4, 11)


def test_errno_and_op_labels_are_bounded_and_named():
    assert len(set(S.ERRNO_LABELS)) == S.N_ERRNO == len(S.ERRNO_NAMES) + 1
    assert S.ERRNO_LABELS[-1] == "other"
    assert all(hasattr(errno, n) for n in S.ERRNO_NAMES)
    assert S.OP_LABELS[Opcode.LOOKUP] == "lookup" and S.OP_LABELS[0] == "unknown"
    assert S.OP_LABELS[7] == "unknown"  # a hole in the opcode numbering
    assert len(set(S.OP_LABELS)) == sum(1 for o in Opcode if o < 64) + 1


def test_record_costs_about_a_third_of_a_microsecond(slab):
    """The hot-path budget: < 2 % of a 10-20 µs request. Measured ~0.25-0.35 µs on the dev
    machine; the bound here only catches gross regressions (shared CI machines are noisy)."""
    record = WorkerMetrics(slab).record
    n = 100_000
    best = min(timeit.repeat(lambda: record(3, 0, 15_000), number=n, repeat=5)) / n
    with_bytes = min(timeit.repeat(lambda: record(15, 0, 40_000, 4096), number=n,
                                   repeat=5)) / n
    empty = min(timeit.repeat(lambda: None, number=n, repeat=5)) / n
    print(f"record(): {(best - empty) * 1e9:.0f} ns, with bytes {(with_bytes - empty) * 1e9:.0f}"
          " ns (lambda overhead subtracted)")
    assert best - empty < 2e-6


# ----------------------------------------------------------------------------- across fork
def test_slab_round_trip_across_fork():
    book = MetricsBook(1)
    try:
        slab = book.renew(0)
        proc = spawn_writer(slab, rounds=100, handles=3, cached=7)
        proc.join(10)
        assert proc.exitcode == 0
        c = book.snapshot().counters
        for op in {w[0] for w in WORKLOAD}:
            assert c.count(op) == 100 * sum(1 for w in WORKLOAD if w[0] == op)
        assert c.bytes_read == 100 * 4096 and c.bytes_written == 100 * 8192
        assert c.errors(Opcode.OPEN)[ERRNO_INDEX[errno.EIO]] == 100
        snap = book.snapshot()
        assert snap.gauges[0] == (proc.pid, 3, 7)
    finally:
        book.close()


def test_buffered_slab_round_trip_across_fork():
    book = MetricsBook(1)
    try:
        proc = spawn_writer(book.renew(0), rounds=50, buffered=True)
        proc.join(10)
        assert proc.exitcode == 0
        c = book.snapshot().counters
        assert c.count(Opcode.LOOKUP) == 100 and c.bytes_written == 50 * 8192
    finally:
        book.close()


@pytest.mark.parametrize("buffered", [False, True], ids=["direct", "buffered"])
def test_concurrent_reads_never_see_counters_go_backwards(buffered):
    """A reader polling while the worker writes sees every counter only grow."""
    book = MetricsBook(1)
    try:
        slab = book.renew(0)
        proc = spawn_writer(slab, rounds=50, period=0.0005, buffered=buffered)
        try:
            last = [0] * S.N_COUNTERS
            deadline = time.monotonic() + 1.0  # > the buffered writer's 100 ms interval
            while time.monotonic() < deadline:
                now = slab.counters()
                assert all(a >= b for a, b in zip(now, last, strict=True))
                last = now
            assert sum(last) > 0
        finally:
            proc.kill()
            proc.join(5)
    finally:
        book.close()


# ----------------------------------------------------------------------------- the book
def test_renew_folds_dead_slab_into_retired_totals():
    book = MetricsBook(2)
    before = shm_names()
    try:
        first = book.renew(0)
        book.renew(1)
        write_workload(WorkerMetrics(first), 2)
        write_workload(WorkerMetrics(book.slab(1)), 1)
        total = book.snapshot().counters
        assert total.count(Opcode.LOOKUP) == 6
        assert book.snapshot().restarts == [0, 0]

        second = book.renew(0)  # slot 0's worker died and is respawned
        assert second is not first and second.counters() == [0] * S.N_COUNTERS
        snap = book.snapshot()
        assert snap.counters.values == total.values, "retired + live must not go backwards"
        assert snap.restarts == [1, 0]

        write_workload(WorkerMetrics(second), 1)
        assert book.snapshot().counters.count(Opcode.LOOKUP) == 8

        book.retire(1)  # slot removed on purpose: folded, not a restart
        snap = book.snapshot()
        assert snap.counters.count(Opcode.LOOKUP) == 8
        assert snap.restarts == [1, 0] and 1 not in snap.gauges
        book.renew(1)
        assert book.snapshot().restarts == [1, 0]
        book.renew(3)  # grows
        assert book.slots == 4 and book.snapshot().restarts == [1, 0, 0, 0]
    finally:
        book.close()
    assert shm_names() <= before


def test_gauges_reported_per_slot_with_writer_pid():
    book = MetricsBook(1)
    try:
        m = WorkerMetrics(book.renew(0))
        m.attach()
        m.set_state(5, 9)
        assert book.snapshot().gauges == {0: (os.getpid(), 5, 9)}
        book.renew(0)
        assert book.snapshot().gauges == {0: (0, 0, 0)}  # fresh slab, no writer yet
    finally:
        book.close()


# ----------------------------------------------------------------------------- buffered writer
def test_buffered_writer_publishes_on_flush(slab):
    m = S.BufferedWorkerMetrics(slab, interval=0.1)
    m.attach()
    m.set_state(2, 5)
    assert slab.pid == os.getpid() and slab.gauges() == (2, 5)  # gauges are not buffered
    write_workload(m, 3)
    assert slab.counters() == [0] * S.N_COUNTERS, "nothing visible before a flush"
    m.flush()
    direct = Slab("direct")
    try:
        write_workload(WorkerMetrics(direct), 3)
        assert slab.counters() == direct.counters()
    finally:
        direct.close()
    m.flush()  # idempotent
    assert Counters(slab.counters()).count(Opcode.LOOKUP) == 6


def test_buffered_writer_maybe_flush_follows_the_interval(slab):
    m = S.BufferedWorkerMetrics(slab, interval=0.1)
    m.record(Opcode.GETATTR, 0, 1000)
    m.maybe_flush(1_000_000_000)  # first call publishes
    assert Counters(slab.counters()).count(Opcode.GETATTR) == 1
    m.record(Opcode.GETATTR, 0, 1000)
    m.maybe_flush(1_050_000_000)  # 50 ms later: not yet
    assert Counters(slab.counters()).count(Opcode.GETATTR) == 1
    m.maybe_flush(1_100_000_000)  # 100 ms later
    assert Counters(slab.counters()).count(Opcode.GETATTR) == 2


def test_direct_writer_flush_is_a_no_op(slab):
    m = WorkerMetrics(slab)
    m.record(Opcode.GETATTR, 0, 1000)
    m.flush()
    m.maybe_flush(0)
    assert Counters(slab.counters()).count(Opcode.GETATTR) == 1


def test_buffered_record_is_cheaper_than_direct(slab):
    n = 100_000
    direct = WorkerMetrics(slab).record
    buffered = S.BufferedWorkerMetrics(slab).record
    t_direct = min(timeit.repeat(lambda: direct(3, 0, 15_000), number=n, repeat=5)) / n
    t_buffered = min(timeit.repeat(lambda: buffered(3, 0, 15_000), number=n, repeat=5)) / n
    print(f"record(): direct {t_direct * 1e9:.0f} ns, buffered {t_buffered * 1e9:.0f} ns"
          " (incl. lambda call)")
    assert t_buffered < 2e-6


def test_supervisor_slab_counts_in_the_totals():
    book = MetricsBook(1)
    try:
        book.renew(0)
        book.supervisor.record(Opcode.INIT, 0, 50_000)
        book.supervisor.record(Opcode.FORGET, 0, 2_000)
        book.supervisor.record(Opcode.READ, errno.EIO, 1_000)  # answered for a dead worker
        c = book.snapshot().counters
        assert c.count(Opcode.INIT) == 1 and c.count(Opcode.FORGET) == 1
        assert c.errors(Opcode.READ)[ERRNO_INDEX[errno.EIO]] == 1
        assert book.snapshot().gauges == {0: (0, 0, 0)}  # not a worker slot
    finally:
        book.close()


def test_snapshot_after_close_is_empty_not_an_error():
    book = MetricsBook(1)
    write_workload(WorkerMetrics(book.renew(0)), 1)
    book.close()
    snap = book.snapshot()
    assert snap.counters.values == [0] * S.N_COUNTERS and snap.gauges == {}
    book.close()  # idempotent
