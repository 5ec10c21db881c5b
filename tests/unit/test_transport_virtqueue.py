"""Guest memory, chain walking and split-ring operations against a memfd "guest"."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from vfsd.frontend import DriverQueue, GuestRam
from vfsd.transport import ChainError, ChainFault, GuestMemoryError, VringError
from vfsd.transport.abi import (
    DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from vfsd.transport.memory import GuestMemory, MemRegion
from vfsd.transport.virtqueue import (
    Vring,
    peek_buffers,
    peek_chain,
    read_chain,
    vring_need_event,
)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
HOLE = 0xA0000  # GuestRam's default layout: [0, 0xA0000) and [0xC0000, size)
HIGH = 0xC0000


@pytest.fixture(autouse=True)
def deadline():
    """A chain walker that loops forever must fail the test, not hang the suite."""

    def expire(_signum, _frame):
        raise TimeoutError("test took more than 10 s (unbounded loop?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 10)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


class MockQueue:
    """One ring in memfd guest RAM: the driver side (`DriverQueue`) and the device side
    (`Vring` + `GuestMemory` mapping the same memfd, as the back-end would)."""

    def __init__(self, size: int = 16, *, event_idx: bool = False, ram: GuestRam | None = None,
                 base: int = 0, used_idx: int = 0) -> None:
        self.own_ram = ram is None
        self.ram = ram or GuestRam(1 << 20)
        self.mem = GuestMemory.from_regions((r, self.ram.fd) for r in self.ram.regions)
        self.driver = DriverQueue(self.ram, 1, size, event_idx=event_idx, indirect=True)
        self.driver.set_avail_idx(base)
        self.driver.last_used_idx = used_idx
        self.ram.view(self.driver.used_gpa + 2, 2).cast("H")[0] = used_idx
        self.vring = Vring(1)
        self.vring.set_size(size)
        self.vring.set_base(base)
        self.vring.set_addresses(self.mem, self.driver.desc_gpa, self.driver.avail_gpa,
                                 self.driver.used_gpa)
        self.vring.event_idx = event_idx
        self.vring.started = self.vring.enabled = True

    @property
    def size(self) -> int:
        return self.vring.size

    def chain(self, head: int):
        return read_chain(self.mem, self.driver.desc_gpa, self.size, head)

    def peek(self, head: int, nbytes: int) -> bytes:
        return peek_chain(self.mem, self.driver.desc_gpa, self.size, head, nbytes)

    def table(self, entries: list[tuple[int, int, int, int]]) -> int:
        """An indirect table with these (addr, len, flags, next) entries; returns its GPA."""
        gpa = self.ram.alloc(16 * len(entries), 16)
        for i, entry in enumerate(entries):
            DESC.pack_into(self.ram.view(gpa, 16 * len(entries)), 16 * i, *entry)
        return gpa

    def buf(self, data: bytes) -> int:
        gpa = self.ram.alloc(len(data))
        self.ram.write(gpa, data)
        return gpa

    def close(self) -> None:
        self.mem.close()
        if self.own_ram:
            self.ram.close()


@pytest.fixture
def mq():
    queues: list[MockQueue] = []

    def make(**kwargs) -> MockQueue:
        queues.append(MockQueue(**kwargs))
        return queues[-1]

    yield make
    for q in queues:
        q.close()


# -- guest memory ----------------------------------------------------------------------------
@pytest.fixture
def memfd():
    fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    yield fd
    os.close(fd)


def test_view_bounds_and_aliasing(memfd):
    mem = GuestMemory()
    mem.add_region(MemRegion(0x10000, 0x8000, 0x7000_0000, 0x1000), memfd)
    mem.add_region(MemRegion(0x40000, 0x4000, 0x7100_0000, 0x20000), memfd)
    v = mem.view(0x10010, 4)
    v[:] = b"abcd"
    assert os.pread(memfd, 4, 0x1010) == b"abcd"  # gpa - region gpa + mmap_offset
    assert mem.view(0x40000, 2).tobytes() == os.pread(memfd, 2, 0x20000)
    assert len(mem.view(0x18000, 0)) == 0  # empty range at the region end
    assert len(mem.view(0x10000, 0x8000)) == 0x8000
    for gpa, length in [(0x18000, 1), (0x17FFF, 2), (0xFFFF, 1), (0x20000, 0), (0x43FFF, 2),
                        (0x10000, -1), (0, 0), (2**64 - 1, 1)]:
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, length)
    # The last-hit cache must not leak across regions.
    for _ in range(3):
        assert mem.view(0x10010, 4).tobytes() == b"abcd"
        with pytest.raises(GuestMemoryError):
            mem.view(0x10010 + 0x8000, 4)
        mem.view(0x40000, 4)
    assert mem.va_to_gpa(0x7000_0010) == 0x10010
    assert mem.va_to_gpa(0x7100_3FFF) == 0x43FFF
    with pytest.raises(GuestMemoryError):
        mem.va_to_gpa(0x7000_8000)
    mem.close()


def test_add_remove_replace_regions(memfd):
    mem = GuestMemory()
    low = MemRegion(0, 0x1000, 0x5000_0000, 0)
    mem.add_region(low, memfd)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_region(MemRegion(0x800, 0x1000, 0x6000_0000, 0), memfd)
    with pytest.raises(GuestMemoryError, match="cannot map"):  # beyond the memfd: SIGBUS guard
        mem.add_region(MemRegion(0x100000, 0x100000, 0x6000_0000, 0x80000), memfd)
    with pytest.raises(GuestMemoryError, match="no memory region"):
        mem.remove_region(MemRegion(0, 0x1000, 0x5000_1000, 0))
    # REM_MEM_REG matches gpa + userspace_addr + size; mmap_offset is ignored.
    assert mem.remove_region(MemRegion(0, 0x1000, 0x5000_0000, 0x9999)) == low
    assert len(mem) == 0
    mem.set_regions([(low, memfd)])
    bad = [(MemRegion(0x2000, 0x1000, 0, 0), memfd), (MemRegion(0x2800, 0x1000, 0, 0), memfd)]
    with pytest.raises(GuestMemoryError):
        mem.set_regions(bad)
    assert [r for r, _fd in mem.regions()] == [low]  # all-or-nothing
    mem.close()


def test_regions_hand_over_to_a_worker(memfd):
    mem = GuestMemory()
    mem.add_region(MemRegion(0x1000, 0x2000, 0x5000_0000, 0x1000), memfd)
    [(_region, fd)] = mem.regions()
    assert fd != memfd and os.fstat(fd).st_ino == os.fstat(memfd).st_ino
    worker = GuestMemory.from_regions(mem.regions())  # dups again; ours stay open
    worker.view(0x1000, 3)[:] = b"xyz"
    assert mem.view(0x1000, 3).tobytes() == b"xyz"
    worker.close()
    assert os.fstat(fd)
    mem.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_close_with_live_views_does_not_fault(memfd):
    mem = GuestMemory()
    mem.add_region(MemRegion(0, 0x1000, 0x5000_0000, 0), memfd)
    view = mem.view(0, 16)
    mem.close()  # mapping stays until the view dies
    view[:2] = b"ok"
    assert os.pread(memfd, 2, 0) == b"ok"
    with pytest.raises(GuestMemoryError):
        mem.view(0, 1)


# -- chains ----------------------------------------------------------------------------------
def test_direct_and_indirect_chains(mq):
    q = mq()
    for indirect in (False, True):
        head = q.driver.add([b"header..", b"args"], [16, 100], indirect=indirect)
        c = q.chain(head)
        assert [v.tobytes() for v in c.readable] == [b"header..", b"args"]
        assert [len(v) for v in c.writable] == [16, 100]
        assert (c.readable_len, c.writable_len, c.head) == (12, 116, head)
        c.writable[1][:3] = b"out"  # writable views write guest memory
        assert q.peek(head, 10) == b"header..ar"
        assert q.peek(head, 100) == b"header..args"


def test_mixed_direct_then_indirect_and_ignored_write_flag(mq):
    q = mq()
    r0 = q.buf(b"first")
    tbl = q.table([(q.buf(b"second"), 6, NEXT, 1), (q.ram.alloc(8), 8, WRITE, 0)])
    d0, d1 = q.driver.take_descs(2)
    q.driver.write_desc(d0, r0, 5, NEXT, d1)
    q.driver.write_desc(d1, tbl, 32, INDIRECT | WRITE, 0)  # WRITE on the pointer is ignored
    c = q.chain(d0)
    assert [v.tobytes() for v in c.readable] == [b"first", b"second"]
    assert c.writable_len == 8


def test_zero_length_descriptors_and_writable_only_chain(mq):
    q = mq()
    d0, d1 = q.driver.take_descs(2)
    q.driver.write_desc(d0, HIGH, 0, NEXT | WRITE, d1)
    q.driver.write_desc(d1, HIGH, 4, WRITE, 0)
    c = q.chain(d0)
    assert (c.readable, c.writable_len) == ([], 4)
    assert q.peek(d0, 48) == b""


def raw_chain(q: MockQueue, entries: list[tuple[int, int, int, int]]) -> int:
    """Write ring descriptors 0..n-1 verbatim; returns head 0."""
    for i, entry in enumerate(entries):
        q.driver.write_desc(i, *entry)
    return 0


CHAIN_FAULTS = {
    "loop": ([(HIGH, 8, NEXT, 1), (HIGH, 8, NEXT, 0)], ChainFault.TOO_MANY_DESCRIPTORS),
    "self_loop": ([(HIGH, 8, NEXT, 0)], ChainFault.TOO_MANY_DESCRIPTORS),
    "next_out_of_range": ([(HIGH, 8, NEXT, 16)], ChainFault.BAD_INDEX),
    "addr_in_hole": ([(HOLE, 8, 0, 0)], ChainFault.BAD_ADDRESS),
    "addr_across_region_end": ([(HOLE - 4, 8, 0, 0)], ChainFault.BAD_ADDRESS),
    "addr_beyond_ram": ([(1 << 40, 8, 0, 0)], ChainFault.BAD_ADDRESS),
    "len_past_end": ([(HIGH, 1 << 20, 0, 0)], ChainFault.BAD_ADDRESS),
    "readable_after_writable": ([(HIGH, 8, NEXT | WRITE, 1), (HIGH, 8, 0, 0)],
                                ChainFault.READABLE_AFTER_WRITABLE),
    "indirect_with_next": ([(HIGH, 16, INDIRECT | NEXT, 1), (HIGH, 8, 0, 0)],
                           ChainFault.INDIRECT_WITH_NEXT),
    "indirect_len_not_16n": ([(HIGH, 24, INDIRECT, 0)], ChainFault.BAD_INDIRECT_TABLE),
    "indirect_len_zero": ([(HIGH, 0, INDIRECT, 0)], ChainFault.BAD_INDIRECT_TABLE),
    "indirect_table_in_hole": ([(HOLE, 32, INDIRECT, 0)], ChainFault.BAD_ADDRESS),
}


@pytest.mark.parametrize("case", CHAIN_FAULTS)
def test_malformed_direct_chains(mq, case):
    entries, fault = CHAIN_FAULTS[case]
    q = mq()
    head = raw_chain(q, entries)
    with pytest.raises(ChainError) as info:
        q.chain(head)
    assert info.value.fault is fault
    with pytest.raises(ChainError):
        q.peek(head, 1 << 20)


def test_head_out_of_range(mq):
    q = mq()
    for head in (16, 65535, -1):
        with pytest.raises(ChainError) as info:
            q.chain(head)
        assert info.value.fault is ChainFault.BAD_INDEX


def test_descriptor_table_outside_memory(mq):
    q = mq()
    with pytest.raises(ChainError) as info:
        read_chain(q.mem, HOLE - 0x80, 16, 0)  # 256-byte table crossing into the hole
    assert info.value.fault is ChainFault.BAD_ADDRESS


INDIRECT_FAULTS = {
    "loop_in_table": (lambda q: [(q.buf(b"x"), 1, NEXT, 1), (q.buf(b"y"), 1, NEXT, 0)],
                      ChainFault.TOO_MANY_DESCRIPTORS),
    "next_beyond_table": (lambda q: [(q.buf(b"x"), 1, NEXT, 2), (q.buf(b"y"), 1, 0, 0)],
                          ChainFault.BAD_INDEX),
    "indirect_in_indirect": (lambda q: [(q.table([(q.buf(b"x"), 1, 0, 0)]), 16, INDIRECT, 0)],
                             ChainFault.NESTED_INDIRECT),
    "readable_after_writable": (lambda q: [(q.ram.alloc(4), 4, WRITE | NEXT, 1),
                                           (q.buf(b"y"), 1, 0, 0)],
                                ChainFault.READABLE_AFTER_WRITABLE),
    "bad_address": (lambda q: [(q.buf(b"x"), 1, NEXT, 1), (HOLE, 1, 0, 0)],
                    ChainFault.BAD_ADDRESS),
}


@pytest.mark.parametrize("case", INDIRECT_FAULTS)
def test_malformed_indirect_tables(mq, case):
    build, fault = INDIRECT_FAULTS[case]
    q = mq()
    entries = build(q)
    head = raw_chain(q, [(q.table(entries), 16 * len(entries), INDIRECT, 0)])
    with pytest.raises(ChainError) as info:
        q.chain(head)
    assert info.value.fault is fault


def test_longest_legal_chains(mq):
    q = mq(size=8)
    data = q.buf(b"abcdefgh")
    raw_chain(q, [(data + i, 1, NEXT, i + 1) for i in range(7)] + [(data + 7, 1, 0, 0)])
    assert q.chain(0).readable_len == 8  # exactly queue_size descriptors
    n = 300  # an indirect table may be longer than the ring
    tbl = q.table([(data, 1, NEXT, i + 1) for i in range(n - 1)] + [(data, 1, 0, 0)])
    raw_chain(q, [(tbl, 16 * n, INDIRECT, 0)])
    assert q.chain(0).readable_len == n


def test_peek_stops_walking_once_it_has_enough(mq):
    q = mq()
    raw_chain(q, [(q.buf(b"0123456789"), 10, NEXT, 1), (HOLE, 8, NEXT, 2), (HIGH, 8, NEXT, 9)])
    assert q.peek(0, 8) == b"01234567"
    assert q.peek(0, 10) == b"0123456789"
    with pytest.raises(ChainError):
        q.peek(0, 11)
    with pytest.raises(ChainError):
        q.chain(0)


@pytest.fixture
def big_ram():
    size = (1 << 31) + (1 << 20)  # sparse memfd: no real memory used
    ram = GuestRam(size, layout=[(0, size, 0)])
    yield ram
    ram.close()


def test_total_length_must_stay_below_2_pow_32(mq, big_ram):
    q = mq(ram=big_ram)
    third = 0x55555555  # 3 * third == 2^32 - 1: the largest legal total
    raw_chain(q, [(0x100000, third, NEXT, 1), (0x100000, third, NEXT | WRITE, 2),
                  (0x100000, third, WRITE, 0)])
    c = q.chain(0)
    assert c.readable_len + c.writable_len == 0xFFFFFFFF
    raw_chain(q, [(0x100000, third, NEXT, 1), (0x100000, third, NEXT | WRITE, 2),
                  (0x100000, third + 1, WRITE, 0)])
    with pytest.raises(ChainError) as info:
        q.chain(0)
    assert info.value.fault is ChainFault.TOO_LONG


# -- ring operations -------------------------------------------------------------------------
def test_pop_avail_and_push_used_round_trip(mq):
    q = mq()
    heads = [q.driver.add([b"req%d" % i], [8]) for i in range(5)]
    assert q.vring.pop_avail() == heads
    assert q.vring.pop_avail() == []
    assert q.vring.last_avail_idx == 5
    q.vring.push_used(heads[1], 3)
    q.vring.push_used_batch([(heads[0], 0), (heads[4], 8)])
    assert q.vring.used_idx == 3 and q.driver.used_idx == 3
    done = q.driver.reap()
    assert [(c.head, c.used_len) for c in done] == [(heads[1], 3), (heads[0], 0), (heads[4], 8)]


def test_indices_wrap_at_65536(mq):
    q = mq(base=65534, used_idx=65535)
    assert q.vring.used_idx == 65535  # read from used.idx at SET_VRING_ADDR
    heads = [q.driver.add([b"x"], [4]) for _ in range(4)]
    assert q.driver.avail_idx == 2
    assert q.vring.pop_avail() == heads
    assert q.vring.last_avail_idx == 2
    for h in heads:
        q.vring.push_used(h, 1)
    assert q.vring.used_idx == 3 and q.driver.used_idx == 3
    assert [c.head for c in q.driver.reap()] == heads


def test_avail_index_running_ahead_is_an_error(mq):
    q = mq()
    q.driver.set_avail_idx(17)
    with pytest.raises(VringError, match="ahead"):
        q.vring.pop_avail()
    q.driver.set_avail_idx(16)  # a full ring is fine
    assert len(q.vring.pop_avail()) == 16


def test_avail_ahead_across_the_wrap(mq):
    q = mq(base=65530)
    q.driver.set_avail_idx(65530 + 17)  # wraps to 11: 17 ahead
    with pytest.raises(VringError):
        q.vring.pop_avail()


def test_disabled_or_stopped_ring_has_no_side_effects(mq):
    q = mq(event_idx=True)
    q.driver.add([b"x"], [1])
    for started, enabled in [(False, True), (True, False)]:
        q.vring.started, q.vring.enabled = started, enabled
        assert q.vring.pop_avail() == []
        assert q.vring.last_avail_idx == 0 and q.driver.avail_event == 0
    q.vring.started = q.vring.enabled = True
    assert len(q.vring.pop_avail()) == 1


@pytest.mark.parametrize(("event", "new", "old", "expected"), [
    (0, 1, 0, True),  # the first entry after used_event=0
    (1, 1, 0, False),  # driver wants an interrupt only after entry 1 is used
    (5, 10, 3, True),
    (9, 10, 3, True),  # crossed exactly at the last entry
    (10, 10, 3, False),
    (2, 10, 3, False),  # event before old: was already signalled
    (0, 0, 0, False),  # nothing new
    (65535, 1, 65534, True),  # across the wrap
    (65533, 1, 65534, False),
    (65535, 0, 65535, True),
])
def test_vring_need_event(event, new, old, expected):
    assert vring_need_event(event, new, old) is expected


def test_event_idx_kick_suppression(mq):
    q = mq(event_idx=True)
    q.driver.add([b"a"], [1])
    assert q.driver.kick_prepare()  # avail_event 0: the first request kicks
    assert q.vring.pop_avail() == [0]
    assert q.driver.avail_event == 1  # device: "kick me when entry 1 is added"
    q.driver.add([b"b"], [1])
    q.driver.add([b"c"], [1])
    assert q.driver.kick_prepare()  # crossed avail_event 1
    q.driver.add([b"d"], [1])
    assert not q.driver.kick_prepare()  # device has not caught up: no new kick needed
    assert len(q.vring.pop_avail()) == 3
    assert q.driver.avail_event == 4
    q.driver.add([b"e"], [1])
    assert q.driver.kick_prepare()


def test_pop_avail_rechecks_after_publishing_avail_event(mq, monkeypatch):
    """B.3 step 5: an entry that lands while avail_event is being published (the driver may
    have read the old avail_event and skipped its kick) is picked up by the re-check."""
    import vfsd.transport.virtqueue as vq

    q = mq(event_idx=True)
    q.driver.add([b"a"], [1])
    real_fence = vq.full_fence
    late = []

    def racing_fence() -> None:
        if not late:
            late.append(q.driver.add([b"late"], [1]))
        real_fence()

    monkeypatch.setattr(vq, "full_fence", racing_fence)
    assert q.vring.pop_avail() == [0, late[0]]
    assert q.driver.avail_event == 2


def test_call_suppression_with_event_idx(mq):
    q = mq(event_idx=True)
    heads = [q.driver.add([b"x"], [1]) for _ in range(3)]
    q.vring.pop_avail()
    q.vring.push_used(heads[0], 1)
    assert q.vring.needs_notification()  # first decision: always
    q.driver.reap()  # driver writes used_event = 1
    q.vring.push_used(heads[1], 1)
    assert q.vring.needs_notification()
    q.vring.push_used(heads[2], 1)  # driver has not re-armed (used_event still 1)
    assert not q.vring.needs_notification()
    q.driver.reap()
    assert not q.vring.needs_notification()  # nothing new since the last decision


def test_first_decision_after_ring_setup_always_signals(mq):
    """libvhost-user's `signalled_used_valid`: after (re)placing a ring the old signalled
    index means nothing, so the first decision signals whatever used_event says."""
    q = mq(event_idx=True)
    heads = [q.driver.add([b"x"], [1]) for _ in range(2)]
    q.vring.pop_avail()
    q.ram.view(q.driver.avail_gpa + 4 + 2 * q.size, 2).cast("H")[0] = 100  # used_event
    q.vring.push_used(heads[0], 1)
    assert q.vring.needs_notification()
    q.vring.push_used(heads[1], 1)
    assert not q.vring.needs_notification()


def test_call_suppression_without_event_idx(mq):
    q = mq()
    h = q.driver.add([b"x"], [1])
    q.vring.pop_avail()
    q.vring.push_used(h, 0)
    assert q.vring.needs_notification()
    q.driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    assert not q.vring.needs_notification()


def test_notify_writes_the_call_eventfd(mq):
    q = mq()
    q.vring.notify()  # no call fd: no-op
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    q.vring.replace_call_fd(fd)
    q.vring.notify()
    q.vring.notify()
    assert os.eventfd_read(fd) == 2
    q.vring.close()


def test_ring_configuration_checks(mq):
    q = mq()
    v = Vring(0, 256)
    for size in (0, 3, 512):
        with pytest.raises(VringError):
            v.set_size(size)
    with pytest.raises(VringError, match="before SET_VRING_NUM"):
        v.set_addresses(q.mem, 0x1000, 0x2000, 0x3000)
    v.set_size(16)
    with pytest.raises(VringError, match="misaligned"):
        v.set_addresses(q.mem, 0x1008, 0x2000, 0x3000)
    with pytest.raises(VringError, match="outside"):
        v.set_addresses(q.mem, HOLE, 0x2000, 0x3000)
    with pytest.raises(VringError):
        v.set_base(65536)


def test_remap_after_memory_table_changes(mq):
    q = mq()
    h = q.driver.add([b"x"], [1])
    regions = [r for r, _fd in q.mem.regions()]
    q.mem.set_regions([(r, q.ram.fd) for r in regions])  # same layout, new mappings
    assert q.vring.remap(q.mem)
    assert q.vring.pop_avail() == [h]
    ring_region = next(r for r in regions if r.guest_phys_addr <= q.driver.desc_gpa < r.gpa_end)
    q.mem.remove_region(ring_region)
    assert not q.vring.remap(q.mem) and not q.vring.ready
    assert q.vring.pop_avail() == []
    with pytest.raises(VringError):
        q.vring.push_used(h, 0)
    q.mem.add_region(ring_region, q.ram.fd)
    assert q.vring.remap(q.mem)
    q.vring.push_used(h, 0)
    assert [c.head for c in q.driver.reap()] == [h]


_WATCHER = textwrap.dedent("""
    import mmap, sys
    fd, idx_off, stop_off = map(int, sys.argv[1:])
    mm = mmap.mmap(fd, 0)
    used_idx = memoryview(mm)[idx_off : idx_off + 2].cast("H")
    prev, zeros, changes = used_idx[0], 0, 0
    print("ready", flush=True)
    while mm[stop_off] == 0:
        cur = used_idx[0]
        if cur != prev:
            changes += 1
            zeros += cur == 0
            prev = cur
    print(zeros, changes, flush=True)
""")


def test_used_idx_store_is_never_seen_half_done(mq):
    """Trap 23: another process polling used.idx must only ever see values we published.
    The writer keeps the index in [1001, 60001], so a 0 can only be a torn store (what
    `struct.pack_into`, which zero-fills first, produces)."""
    q = mq(size=256)
    stop_gpa = q.ram.alloc(1)
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(q.ram.fd),
         str(q.ram.file_offset(q.driver.used_gpa + 2, 2)), str(q.ram.file_offset(stop_gpa, 1))],
        stdout=subprocess.PIPE, text=True, pass_fds=[q.ram.fd])
    try:
        assert watcher.stdout.readline().strip() == "ready"
        vring = q.vring
        vring.used_idx = 1000
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            for head in range(256):
                vring.push_used(head, 0)
            if vring.used_idx > 60000:
                vring.used_idx = 1000
    finally:
        q.ram.write(stop_gpa, b"\x01")
        out, _ = watcher.communicate(timeout=10)
    zeros, changes = map(int, out.split())
    assert changes > 0, "the watcher did not observe the writer"
    assert zeros == 0


# -- long tables in Linux's layout: the vectorised walk (`_walk_linear`) ---------------------
def linux_table(q: MockQueue, readable: list[tuple[int, int]], writable: list[tuple[int, int]]
                ) -> list[tuple[int, int, int, int]]:
    """(addr, len) buffers linked in order, readable first, as Linux builds a table."""
    flags = [0] * len(readable) + [WRITE] * len(writable)
    bufs = readable + writable
    return [(a, n, f | (NEXT if i < len(bufs) - 1 else 0), i + 1 if i < len(bufs) - 1 else 0)
            for i, ((a, n), f) in enumerate(zip(bufs, flags, strict=True))]


def indirect(q: MockQueue, entries) -> int:
    return raw_chain(q, [(q.table(entries), 16 * len(entries), INDIRECT, 0)])


def test_long_table_with_adjacent_pages_is_one_view_per_run(mq):
    q = mq()
    hdr = q.buf(bytes(range(80)))
    out = q.ram.alloc(16)
    pages = q.ram.alloc(32 * 512, 4096)
    other = q.ram.alloc(512, 4096)
    q.ram.write(pages, bytes(i % 251 for i in range(32 * 512)))
    # 2 readable (adjacent: one run), 1 + 32 writable: out header, 20 adjacent pages, one
    # page elsewhere, 12 adjacent pages again
    runs = [(pages + 512 * i, 512) for i in range(20)] + [(other, 512)] + [
        (pages + 512 * i, 512) for i in range(20, 32)]
    c = q.chain(indirect(q, linux_table(q, [(hdr, 40), (hdr + 40, 40)], [(out, 16), *runs])))
    assert [len(v) for v in c.readable] == [80]
    assert c.readable[0].tobytes() == bytes(range(80))
    assert [len(v) for v in c.writable] == [16, 20 * 512, 512, 12 * 512]
    assert (c.readable_len, c.writable_len) == (80, 16 + 33 * 512)
    assert c.writable[3].tobytes() == q.ram.read(pages + 20 * 512, 12 * 512)
    c.writable[1][:4] = b"page"  # views write guest memory
    assert q.ram.read(pages, 4) == b"page"


def test_long_table_of_scattered_pages_is_one_view_per_buffer(mq):
    q = mq()
    hdr = q.buf(b"h" * 40)
    pages = [q.ram.alloc(256, 4096) for _ in range(12)]
    for i, gpa in enumerate(pages):
        q.ram.write(gpa, bytes([i]) * 256)
    # Reverse order: no buffer continues the previous one. Plus one in the other region.
    far = q.ram.size - 64  # the end of the high region (the allocator starts low)
    assert pages[0] < HOLE < far
    bufs = [(gpa, 256) for gpa in reversed(pages)] + [(far, 64)]
    c = q.chain(indirect(q, linux_table(q, [(hdr, 40)], bufs)))
    assert [v.tobytes()[:1] for v in c.writable[:12]] == [bytes([i]) for i in range(11, -1, -1)]
    assert [len(v) for v in c.writable] == [256] * 12 + [64]


LONG = 12  # entries of padding: long enough for the vectorised walk


@pytest.mark.parametrize("case", INDIRECT_FAULTS)
def test_malformed_long_tables_fail_like_short_ones(mq, case):
    """The vectorised walk hands anything unusual to the checked walk: same faults."""
    build, fault = INDIRECT_FAULTS[case]
    q = mq()
    pad = q.buf(b"p")
    entries = [(pad, 1, NEXT, i + 1) for i in range(LONG)]
    entries += [(a, n, f, nxt + LONG if f & NEXT else nxt) for a, n, f, nxt in build(q)]
    if case == "readable_after_writable":
        entries[:LONG] = [(q.ram.alloc(1), 1, WRITE | NEXT, i + 1) for i in range(LONG)]
    with pytest.raises(ChainError) as info:
        q.chain(indirect(q, entries))
    assert info.value.fault is fault


def test_long_table_buffer_across_the_hole_is_a_bad_address(mq):
    q = mq()
    hdr = q.buf(b"h" * 40)
    bufs = [(q.ram.alloc(16), 16) for _ in range(LONG)] + [(HOLE - 8, 16)]
    with pytest.raises(ChainError) as info:
        q.chain(indirect(q, linux_table(q, [(hdr, 40)], bufs)))
    assert info.value.fault is ChainFault.BAD_ADDRESS


def test_peek_buffers_reads_linux_layouts_and_declines_the_rest(mq):
    q = mq()
    hdr = q.buf(b"H" * 40)
    args = q.buf(b"A" * 16)
    out = q.ram.alloc(16)
    desc = q.vring.desc_table
    head = indirect(q, linux_table(q, [(hdr, 40), (args, 16)], [(out, 16)]))
    assert peek_buffers(q.mem, desc, head) == (hdr, 40, args, 16)
    head = indirect(q, linux_table(q, [(hdr, 40)], [(out, 16)]))
    assert peek_buffers(q.mem, desc, head) == (hdr, 40, 0, 0)  # entry 1 is the reply's
    assert q.mem.unpack(struct.Struct("<4s"), hdr + 36) == (b"HHHH",)
    with pytest.raises(GuestMemoryError):
        q.mem.unpack(struct.Struct("<8s"), HOLE - 4)  # reads are bounds-checked
    raw_chain(q, [(hdr, 48, 0, 0)])  # one direct buffer (how Linux sends a FORGET)
    assert peek_buffers(q.mem, desc, 0) == (hdr, 48, 0, 0)
    raw_chain(q, [(hdr, 40, NEXT, 3), (0, 0, 0, 0), (0, 0, 0, 0), (args, 16, NEXT, 1)])
    assert peek_buffers(q.mem, desc, 0) == (hdr, 40, args, 16)  # direct, linked anywhere
    raw_chain(q, [(hdr, 40, NEXT, 1), (out, 16, WRITE, 0)])
    assert peek_buffers(q.mem, desc, 0) == (hdr, 40, 0, 0)
    raw_chain(q, [(hdr, 40, NEXT, q.size)])  # next beyond the ring
    assert peek_buffers(q.mem, desc, 0) is None
    raw_chain(q, [(out, 16, WRITE, 0)])
    assert peek_buffers(q.mem, desc, 0) is None
    raw_chain(q, [(q.table([(hdr, 40, 0, 0)]), 16, INDIRECT | NEXT, 1)])  # illegal combination
    assert peek_buffers(q.mem, desc, 0) is None
    for entries in ([(out, 16, WRITE, 0)], [(q.table([(hdr, 40, 0, 0)]), 16, INDIRECT, 0)]):
        assert peek_buffers(q.mem, desc, indirect(q, entries)) is None
    raw_chain(q, [(HOLE, 32, INDIRECT, 0)])  # table outside guest memory
    assert peek_buffers(q.mem, desc, 0) is None
    assert peek_buffers(q.mem, desc, q.size) is None  # head beyond the ring
