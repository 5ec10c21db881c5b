"""The bench's reply validator and engine against a fake in-process device.

Why a fake device: a healthy daemon never sends a wrong `unique`, so only a device that lies
on purpose proves the bench counts (and does not hide) broken replies.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from vfsd.bench.engine import BenchError, Engine, Slot
from vfsd.frontend.fuse_client import OUT_SIZE, check_reply
from vfsd.frontend.vhost_client import DriverQueue, GuestRam
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.transport.memory import GuestMemory
from vfsd.transport.virtqueue import Vring, read_chain

ATTR_REPLY = OUT_SIZE + abi.ATTR_OUT.size


def header(length: int, error: int, unique: int) -> bytes:
    return abi.OUT_HEADER.pack(length, error, unique)


# -- check_reply -------------------------------------------------------------------------------
def test_check_reply_accepts_a_correct_reply():
    assert check_reply(header(120, 0, 8), 120, 8, length=120) is None
    assert check_reply(header(16, -2, 8), 16, 8, error=2) is None
    assert check_reply(header(16, -2, 8), 16, 8, error=None) is None
    assert check_reply(header(100, 0, 8), 100, 8, max_length=4112) is None


@pytest.mark.parametrize(("hdr", "used", "kw", "words"), [
    (header(120, 0, 10), 120, {"length": 120}, "unique"),
    (header(120, 0, 8), 112, {"length": 120}, "used length"),
    (header(112, 0, 8), 112, {"length": 120}, "expected 120"),
    (header(16, 5, 8), 16, {}, "not a negative errno"),
    (header(16, -600, 8), 16, {}, "not a negative errno"),
    (header(32, -2, 8), 32, {"error": None}, "header only"),
    (header(16, -2, 8), 16, {}, "errno 2"),
    (header(16, -13, 8), 16, {"error": 2}, "expected 2"),
    (header(16, 0, 8), 16, {"error": 2}, "expected errno 2"),
    (header(4200, 0, 8), 4200, {"max_length": 4112}, "exceeds"),
    (header(8, 0, 8), 8, {}, "shorter"),
])
def test_check_reply_names_what_is_wrong(hdr, used, kw, words):
    problem = check_reply(hdr, used, 8, **kw)
    assert problem is not None and words in problem, problem


# -- the engine over a fake device -------------------------------------------------------------
Responder = Callable[[int, bytes, list[memoryview]], int]


class FakeClient:
    """What `Engine` uses of `VhostUserClient`, served synchronously at each kick by a device
    built from vfsd's own device-side ring code; `respond` writes each reply."""

    def __init__(self, respond: Responder, queue_size: int = 64) -> None:
        self.respond = respond
        self.ram = GuestRam(8 << 20)
        self.queues = [DriverQueue(self.ram, i, queue_size, event_idx=True, indirect=True)
                       for i in range(2)]
        self.call_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.mem = GuestMemory.from_regions([(r, self.ram.fd) for r in self.ram.regions])
        self.vrings = []
        for q in self.queues:
            v = Vring(q.index, queue_size)
            v.set_size(queue_size)
            v.set_addresses(self.mem, q.desc_gpa, q.avail_gpa, q.used_gpa)
            v.started = v.enabled = v.event_idx = True
            self.vrings.append(v)
        self.served = 0

    def kick(self, queue: int, *, force: bool = False) -> bool:
        v = self.vrings[queue]
        done = []
        for head in v.pop_avail():
            chain = read_chain(self.mem, v.desc_gpa, v.size, head)
            request = b"".join(bytes(x) for x in chain.readable)
            done.append((head, self.respond(self.served, request, chain.writable)))
            self.served += 1
        v.push_used_batch(done)
        if v.needs_notification():
            os.eventfd_write(self.call_fds[queue], 1)
        return True

    def close(self) -> None:
        for v in self.vrings:
            v.unmap()
        self.mem.close()
        for fd in self.call_fds:
            os.close(fd)
        self.queues = []
        self.ram.close()


def getattr_responder(bad: Callable[[int], str | None]) -> Responder:
    """Answers GETATTR correctly, except request n gets the defect `bad(n)`."""

    def respond(n: int, request: bytes, writable: list[memoryview]) -> int:
        _len, opcode, unique = abi.IN_HEADER.unpack_from(request)[:3]
        assert opcode == Opcode.GETATTR
        defect = bad(n)
        length, error = ATTR_REPLY, 0
        if defect == "unique":
            unique += 2
        elif defect == "short":
            length -= 8
        elif defect == "errno":
            length, error = OUT_SIZE, -5
        abi.OUT_HEADER.pack_into(writable[0], 0, length, error, unique)
        return length

    return respond


class GetattrLoop:
    name = "fake-getattr"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.good = 0
        self.bad = 0

    def start(self, slot: Slot) -> None:
        abi.GETATTR_IN.pack_into(slot.args, 0, 0, 0, 0)
        self.engine.submit(slot, Opcode.GETATTR, 1, abi.GETATTR_IN.size,
                           out_len=abi.ATTR_OUT.size, length=ATTR_REPLY)

    def on_reply(self, slot: Slot, ok: bool, stopping: bool) -> int:
        if ok:
            self.good += 1
        else:
            self.bad += 1
        if not stopping:
            self.start(slot)
        return 1


@pytest.fixture
def fake():
    clients: list[FakeClient] = []

    def make(respond: Responder) -> FakeClient:
        clients.append(FakeClient(respond))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


@pytest.mark.parametrize("qd", [1, 8])
def test_engine_counts_every_broken_reply(fake, qd):
    defects = {0: "unique", 1: "unique", 5: "short", 9: "errno"}
    client = fake(getattr_responder(lambda n: defects.get(n % 50)))
    engine = Engine(client)  # type: ignore[arg-type]
    loop = GetattrLoop(engine)
    slots = engine.make_slots(qd)
    stats = engine.run(loop, slots, duration=0.05)
    engine.free_slots(slots)
    assert stats.requests == client.served == loop.good + loop.bad
    assert stats.requests > 50
    assert stats.errors == loop.bad > 0
    expected = sum(1 for n in range(client.served) if n % 50 in defects)
    assert stats.errors == expected
    assert any("unique" in s for s in stats.error_samples)
    assert len(stats.latencies_ns) == stats.requests


def test_engine_healthy_device_has_no_errors(fake):
    client = fake(getattr_responder(lambda n: None))
    engine = Engine(client)  # type: ignore[arg-type]
    loop = GetattrLoop(engine)
    slots = engine.make_slots(4)
    stats = engine.run(loop, slots, duration=0.02)
    assert stats.errors == 0 and stats.ops == stats.requests > 0
    engine.free_slots(slots)
    # every descriptor and buffer came back
    assert client.queues[1].free_descs == client.queues[1].size


def test_engine_rejects_requests_larger_than_the_slot(fake):
    client = fake(getattr_responder(lambda n: None))
    engine = Engine(client)  # type: ignore[arg-type]
    [slot] = engine.make_slots(1)
    with pytest.raises(BenchError, match="exceeds"):
        engine.submit(slot, Opcode.READ, 1, 40, out_len=1 << 20)


@pytest.mark.parametrize("scatter", [False, True])
def test_payload_pages_adjacent_or_scattered(fake, scatter):
    client = fake(getattr_responder(lambda n: None))
    engine = Engine(client, scatter=scatter)  # type: ignore[arg-type]
    segs = engine._segments(0x10000, 10_000, 0)
    assert [n for _, n, _ in segs] == [4096, 4096, 1808]  # stream order, short piece last
    if scatter:  # reverse placement: no piece follows the one before it in memory
        assert [a - 0x10000 for a, _, _ in segs] == [8192, 4096, 0]
        assert engine._room(10_000) == 3 * 4096  # the short piece gets a whole slot
    else:
        assert [a - 0x10000 for a, _, _ in segs] == [0, 4096, 8192]
