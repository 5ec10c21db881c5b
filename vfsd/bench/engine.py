"""The pipelined driver: keeps `queue_depth` FUSE requests in flight and checks every reply.

Why its own loop instead of `VhostUserClient.submit`/`wait`: a load generator must not be the
bottleneck. Each slot (one in-flight request) owns fixed guest buffers, one ring descriptor
and an indirect table written once per request *shape*, so issuing a request is: pack the
in_header (+ args), publish the head; and completions are reaped in batches with one kick
per batch, the way Linux's virtio-fs driver does (indirect chains, EVENT_IDX, interrupt on
the call eventfd). Buffers are laid out like the guest kernel's: in_header and args in
separate descriptors, payloads cut into 4 KiB "pages" (`segment`).

Workloads (`vfsd.bench.workloads`) drive slots through `submit`/`forget` from `on_reply`.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass, field
from typing import Protocol

from vfsd.frontend.fuse_client import HIPRIO_QUEUE, IN_SIZE, OUT_SIZE, REQUEST_QUEUE, check_reply
from vfsd.frontend.vhost_client import DriverQueue, VhostUserClient
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.transport.abi import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)

ARGS_MAX = 512  # largest op argument block the workloads send (CREATE_IN + a short name)
REPLY_MIN = 256  # reply body room every slot has (fuse_entry_out + fuse_open_out = 144)
PAGE = 4096
FORGET_SLOTS = 256  # FORGETs in flight on the hiprio queue at most
MAX_ERROR_SAMPLES = 5
_HDR = abi.IN_HEADER_38.pack_into
_FORGET_REQ = abi.IN_HEADER_38.size + abi.FORGET_IN.size


class BenchError(Exception):
    """The run cannot go on (back-end stalled, missing feature, set-up failed)."""


class Slot:
    """One request in flight: its guest buffers, ring descriptor and what it expects."""

    __slots__ = (
        "args", "body", "body_gpa", "data", "data_gpa", "error", "hdr", "hdr_gpa", "head",
        "index", "io", "length", "max_length", "out", "out_gpa", "shape", "state", "t0",
        "table", "table_gpa", "unique",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.unique = 0
        self.t0 = 0
        self.shape: tuple[int, int, int] | None = None
        self.error = 0  # expected errno
        self.length: int | None = None  # exact reply length on success
        self.max_length: int | None = None
        self.io = 0  # payload bytes this request moves
        self.state: dict = {}  # the workload's per-slot state


class Workload(Protocol):
    """What the engine needs from a workload (see `vfsd.bench.workloads`)."""

    name: str

    def start(self, slot: Slot) -> None:
        """Issue the slot's first request."""

    def on_reply(self, slot: Slot, ok: bool, stopping: bool) -> int:
        """Consume a validated reply (`ok` False: already counted as an error); issue the
        slot's next request unless `stopping` (mid-cycle requests may still go); return the
        workload ops this reply completed."""
        ...


@dataclass
class RunStats:
    ops: int = 0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    io_bytes: int = 0
    forgets: int = 0
    kicks: int = 0  # kick eventfd writes (the device asked for them: EVENT_IDX)
    interrupts: int = 0  # wake-ups by a call eventfd
    elapsed_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)


class Engine:
    """Pipelined FUSE traffic on one request queue (+ FORGETs on hiprio) of a started client."""

    def __init__(self, client: VhostUserClient, *, queue: int = REQUEST_QUEUE,
                 hiprio: int = HIPRIO_QUEUE, segment: int = PAGE, scatter: bool = False,
                 uid: int = 0, gid: int = 0, stall_timeout: float = 10.0) -> None:
        self.client = client
        self.ram = client.ram
        self.queue = queue
        self.hiprio = hiprio
        self.q: DriverQueue = client.queues[queue]
        self.hq: DriverQueue = client.queues[hiprio]
        if not self.q.indirect:
            raise BenchError("the back-end did not negotiate VIRTIO_RING_F_INDIRECT_DESC")
        self.segment = segment
        self.scatter = scatter
        self.uid, self.gid, self.pid = uid, gid, os.getpid()
        self.stall_timeout = stall_timeout
        self._unique = 2
        self._max_entries = self.q.size
        self.stats = RunStats()
        self._inflight = 0
        self._submitted = False
        self._by_head: dict[int, Slot] = {}
        self._forget_free: list[tuple[int, int, memoryview]] = []  # (desc, gpa, view)
        self._forget_descs: dict[int, tuple[int, int, memoryview]] = {}
        self._forget_backlog: list[tuple[int, int]] = []

    # -- slots -----------------------------------------------------------------------------
    def make_slots(self, count: int, args_max: int = ARGS_MAX, in_data: int = 0,
                   out_body: int = 0) -> list[Slot]:
        """`count` slots able to send `args_max` bytes of args + `in_data` payload and take a
        reply body of `out_body` bytes."""
        if count > self.q.free_descs:
            raise BenchError(f"queue depth {count} exceeds the free descriptors "
                             f"({self.q.free_descs}) of queue {self.queue}")
        out_body = max(out_body, REPLY_MIN)
        entries = 4 + self._pages(in_data) + self._pages(out_body)
        if entries > self._max_entries:
            raise BenchError(f"a {max(in_data, out_body)}-byte request needs {entries} "
                             f"descriptors; queue size is {self._max_entries}")
        slots = []
        ram = self.ram
        for i in range(count):
            s = Slot(i)
            [s.head] = self.q.take_descs(1)
            s.table_gpa = ram.alloc(16 * entries, 16)
            s.table = ram.view(s.table_gpa, 16 * entries)
            s.hdr_gpa = ram.alloc(IN_SIZE + args_max, 64)
            s.hdr = ram.view(s.hdr_gpa, IN_SIZE)
            s.args = ram.view(s.hdr_gpa + IN_SIZE, args_max)
            s.data_gpa = ram.alloc(self._room(in_data), PAGE)
            s.data = ram.view(s.data_gpa, max(in_data, 1))
            s.out_gpa = ram.alloc(OUT_SIZE, 64)
            s.out = ram.view(s.out_gpa, OUT_SIZE)
            s.body_gpa = ram.alloc(self._room(out_body), PAGE)
            s.body = ram.view(s.body_gpa, max(out_body, 1))
            self._by_head[s.head] = s
            slots.append(s)
        return slots

    def free_slots(self, slots: list[Slot]) -> None:
        """Give the slots' buffers and descriptors back (none may be in flight)."""
        for s in slots:
            for view in (s.table, s.hdr, s.args, s.data, s.out, s.body):
                view.release()
            for gpa in (s.table_gpa, s.hdr_gpa, s.data_gpa, s.out_gpa, s.body_gpa):
                self.ram.free(gpa)
            self.q._free_descs.append(s.head)  # take_descs has no public inverse
            del self._by_head[s.head]

    def _pages(self, n: int) -> int:
        seg = self.segment or n or 1
        return -(-n // seg)

    def _room(self, n: int) -> int:
        """Bytes to allocate for an n-byte payload: whole segments (`scatter` places the
        short last piece in a whole slot)."""
        return self._pages(n) * (self.segment or n) if n else 0

    # -- issuing -----------------------------------------------------------------------------
    def submit(self, slot: Slot, opcode: int, nodeid: int, args_len: int, *,
               data_len: int = 0, out_len: int = 0, length: int | None = None,
               max_length: int | None = None, error: int = 0, io: int = 0) -> None:
        """Send the slot's request: the workload already wrote `args_len` bytes into
        `slot.args` (and the payload into `slot.data`). `out_len` is the reply body buffer;
        `length`/`max_length`/`error` what a correct reply looks like; `io` the payload
        bytes counted for MB/s on success."""
        shape = (args_len, data_len, out_len)
        if shape != slot.shape:
            self._write_table(slot, shape)
        unique = self._unique
        self._unique = unique + 2
        _HDR(slot.hdr, 0, IN_SIZE + args_len + data_len, opcode, unique, nodeid, self.uid,
             self.gid, self.pid, 0, 0)
        slot.unique = unique
        slot.length = length
        slot.max_length = max_length
        slot.error = error
        slot.io = io
        q = self.q
        q.track(slot.head, [])
        slot.t0 = time.perf_counter_ns()
        q.publish(slot.head)
        self._inflight += 1
        self._submitted = True

    def _write_table(self, slot: Slot, shape: tuple[int, int, int]) -> None:
        args_len, data_len, out_len = shape
        if args_len > len(slot.args) or data_len > len(slot.data) or out_len > len(slot.body):
            raise BenchError(f"request shape {shape} exceeds the slot's buffers "
                             f"({len(slot.args)}, {len(slot.data)}, {len(slot.body)})")
        elems = [(slot.hdr_gpa, IN_SIZE, 0)]
        if args_len:
            elems.append((slot.hdr_gpa + IN_SIZE, args_len, 0))
        elems += self._segments(slot.data_gpa, data_len, 0)
        elems.append((slot.out_gpa, OUT_SIZE, VRING_DESC_F_WRITE))
        elems += self._segments(slot.body_gpa, out_len, VRING_DESC_F_WRITE)
        n = len(elems)
        for i, (addr, size, flags) in enumerate(elems):
            last = i == n - 1
            DESC.pack_into(slot.table, 16 * i, addr, size,
                           flags | (0 if last else VRING_DESC_F_NEXT), 0 if last else i + 1)
        self.q.write_desc(slot.head, slot.table_gpa, 16 * n, VRING_DESC_F_INDIRECT, 0)
        slot.shape = shape

    def _segments(self, gpa: int, n: int, flags: int) -> list[tuple[int, int, int]]:
        """The payload's descriptors: `segment`-byte pieces of the buffer at `gpa`, in
        order (adjacent in guest memory, so a back-end may merge them), or with `scatter`
        the pieces of the stream placed in reverse order in the buffer (none adjacent)."""
        seg = self.segment or n
        offsets = range(0, n, seg)
        if not self.scatter:
            return [(gpa + off, min(seg, n - off), flags) for off in offsets]
        slots = list(reversed(offsets))  # stream piece i lives in the i-th slot from the end
        return [(gpa + slot, min(seg, n - off), flags) for off, slot in zip(offsets, slots,
                                                                              strict=True)]

    def forget(self, nodeid: int, nlookup: int = 1) -> None:
        """Queue a FORGET on the hiprio queue (sent at the end of the current batch)."""
        self._forget_backlog.append((nodeid, nlookup))

    def _flush_forgets(self) -> None:
        backlog = self._forget_backlog
        if not backlog:
            return
        if not self._forget_free and self.hq.inflight < FORGET_SLOTS:
            self._grow_forget_pool()
        hq = self.hq
        sent = 0
        while backlog and self._forget_free:
            nodeid, n = backlog.pop()
            desc, gpa, view = self._forget_free.pop()
            unique = self._unique
            self._unique = unique + 2
            _HDR(view, 0, _FORGET_REQ, Opcode.FORGET, unique, nodeid, self.uid, self.gid,
                 self.pid, 0, 0)
            abi.FORGET_IN.pack_into(view, IN_SIZE, n)
            hq.write_desc(desc, gpa, _FORGET_REQ, 0, 0)
            hq.track(desc, [])
            hq.publish(desc)
            sent += 1
        if sent:
            self.stats.kicks += self.client.kick(self.hiprio)
            self.stats.forgets += sent

    def _grow_forget_pool(self) -> None:
        """Linux sends each FORGET as one readable buffer (in_header + forget_in)."""
        n = min(FORGET_SLOTS, self.hq.free_descs)
        for desc in self.hq.take_descs(n):
            gpa = self.ram.alloc(_FORGET_REQ, 64)
            self._forget_free.append((desc, gpa, self.ram.view(gpa, _FORGET_REQ)))
            self._forget_descs[desc] = self._forget_free[-1]

    def _reap_hiprio(self) -> None:
        for c in self.hq.reap():
            entry = self._forget_descs.get(c.head)
            if entry is None:
                continue
            self._forget_free.append(entry)
            if c.used_len != 0:
                self._error(f"FORGET: used length {c.used_len} (FORGET has no reply)")

    # -- the loop ----------------------------------------------------------------------------
    def run(self, workload: Workload, slots: list[Slot], duration: float) -> RunStats:
        """Start every slot, then reap → validate → resubmit until `duration` passed and
        every request (and FORGET) is back."""
        self.stats = stats = RunStats()
        client, q, hq = self.client, self.q, self.hq
        by_head = self._by_head
        latencies = stats.latencies_ns
        record = latencies.append
        poller = select.poll()
        call_q, call_h = client.call_fds[self.queue], client.call_fds[self.hiprio]
        poller.register(call_q, select.POLLIN)
        poller.register(call_h, select.POLLIN)
        self._inflight = 0
        t0 = time.perf_counter_ns()
        deadline = t0 + int(duration * 1e9)
        for slot in slots:
            workload.start(slot)
        self._kick()
        stopping = False
        idle_since = None
        while self._inflight or hq.inflight or self._forget_backlog:
            done = q.reap()
            if done:
                idle_since = None
                now = time.perf_counter_ns()
                stopping = now >= deadline
                for c in done:
                    slot = by_head[c.head]
                    self._inflight -= 1
                    stats.requests += 1
                    record(now - slot.t0)
                    problem = check_reply(slot.out, c.used_len, slot.unique, error=slot.error,
                                          length=slot.length, max_length=slot.max_length)
                    if problem is not None:
                        self._error(f"{workload.name}: {problem}")
                        stats.ops += workload.on_reply(slot, False, stopping)
                    else:
                        stats.io_bytes += slot.io
                        stats.ops += workload.on_reply(slot, True, stopping)
                self._kick()
            if hq.inflight:
                self._reap_hiprio()
            self._flush_forgets()
            if done or not (self._inflight or hq.inflight or self._forget_backlog):
                continue
            if q.has_used() or hq.has_used():
                continue
            events = poller.poll(min(1000, self.stall_timeout * 1000))
            for fd, _ in events:
                try:
                    os.eventfd_read(fd)
                    stats.interrupts += 1
                except BlockingIOError:
                    pass
            if not events:
                now = time.perf_counter_ns()
                if idle_since is None:
                    idle_since = now
                elif now - idle_since > self.stall_timeout * 1e9:
                    raise BenchError(f"{workload.name}: no completion for "
                                     f"{self.stall_timeout:g} s with {self._inflight} requests "
                                     f"and {hq.inflight} FORGETs in flight")
        stats.elapsed_ns = time.perf_counter_ns() - t0
        return stats

    def _kick(self) -> None:
        if self._submitted:
            self._submitted = False
            self.stats.kicks += self.client.kick(self.queue)

    def _error(self, message: str) -> None:
        self.stats.errors += 1
        if len(self.stats.error_samples) < MAX_ERROR_SAMPLES:
            self.stats.error_samples.append(message)

    def fail(self, slot: Slot, message: str) -> None:
        """A workload-level check failed (e.g. WRITE wrote fewer bytes): count an error."""
        self._error(message)
