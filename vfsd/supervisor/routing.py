"""The request path: pop a request queue, route each chain to a worker ring."""

from __future__ import annotations

import errno
import logging
import struct
import time

from vfsd.dispatch.fh import fh_lendable, fh_owner
from vfsd.dispatch.ring import RingFull
from vfsd.fuse import abi
from vfsd.supervisor.state import SupervisorState
from vfsd.supervisor.wire import HIPRIO, IN_PREFIX, IN_SIZE
from vfsd.transport import GuestMemoryError, GuestProtocolError
from vfsd.transport.virtqueue import Vring, peek_buffers, peek_chain

log = logging.getLogger("vfsd.supervisor")

ROUTE_BYTES = 48  # fuse_in_header + the first u64 of the body (the fh of fh-carrying ops)
_FH = struct.Struct("<Q")
_HIPRIO_OPS = frozenset({abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT})
_SUPERVISOR_OPS = frozenset(int(op) for op in (*_HIPRIO_OPS, abi.Opcode.INIT,
                                                abi.Opcode.DESTROY))
_READ, _WRITE = int(abi.Opcode.READ), int(abi.Opcode.WRITE)
_FH_OPCODES = frozenset(int(op) for op in abi.FH_OPCODES)  # plain ints: cheaper lookups
_DEAD = 1 << 30  # the load of a worker slot without a process
# READ/WRITE of at least this many bytes may be served by a worker that is not the fh's
# owner (it borrows the fd). Smaller ones stay with the owner: on a 2-core machine lending
# 4 KiB ops costs more than it gains (read4k QD 16, 2 workers: 57-81k ops/s lent vs
# 82-96k not; write4k 39-48k vs 55-76k: borrowing syscalls, and writers of one file queue
# on its inode lock).
_LEND_MIN = 64 * 1024
_READ_HEAD = struct.Struct("<QQI")  # fuse_read_in: fh, offset, size


class Routing(SupervisorState):
    def process_queue(self, vring: Vring) -> None:
        if not vring.ready or self.mem is None:
            return
        try:
            heads = vring.pop_avail()
        except GuestProtocolError as e:
            log.error("queue %d broken: %s", vring.index, e)
            return
        if vring.index == HIPRIO:
            self.serve_hiprio(vring, heads)
        else:
            self.route(vring, heads)

    def route(self, vring: Vring, heads: list[int]) -> None:
        """Send each request to a worker: fh-carrying ops to the fh's owner (or, for READ and
        large WRITE, to a less busy worker that borrows the fd), the rest to the least-loaded
        worker. Runs once per request: header fields are unpacked straight from guest
        memory in Linux's layouts (`peek_buffers`), with `peek_chain` for any other."""
        assert self.pool is not None and self.mem is not None
        mem = self.mem
        desc_table = vring.desc_table
        slots = self.pool.slots
        batches: dict[int, list[int]] = {}
        loads = [len(s.inflight) if s.process is not None else _DEAD for s in slots]
        idle = [load == 0 for load in loads]
        nslots = len(slots)
        queue = vring.index
        pending = self.used_locks[queue].pending
        now = time.monotonic_ns()
        for head in heads:
            fh = -1
            io = 0  # READ/WRITE payload bytes, when known
            found = peek_buffers(mem, desc_table, head) if desc_table is not None else None
            if found is not None and found[1] >= IN_SIZE:
                a0, l0, a1, l1 = found
                try:
                    in_len, opcode, unique, nodeid = mem.unpack(IN_PREFIX, a0)
                    if opcode in _FH_OPCODES:
                        # The body (fh first; a READ's size at 16) follows the header in
                        # the same buffer, or starts the next one.
                        body, room = ((a0 + IN_SIZE, l0 - IN_SIZE) if l0 > IN_SIZE
                                      else (a1, l1))
                        if room >= _READ_HEAD.size and opcode == _READ:
                            fh, _offset, io = mem.unpack(_READ_HEAD, body)
                        elif room >= _FH.size:
                            fh = mem.unpack(_FH, body)[0]
                        else:
                            found = None  # the fh is split: gather the prefix below
                except GuestMemoryError:
                    found = None  # a buffer outside guest memory: the checked walk says so
            else:
                found = None
            if found is None:
                try:
                    prefix = peek_chain(mem, vring.desc_gpa, vring.size, head, ROUTE_BYTES)
                except GuestProtocolError as e:
                    log.warning("dropping chain queue=%d head=%d: %s", queue, head, e)
                    self.complete_now(vring, head, 0)
                    continue
                if len(prefix) < IN_SIZE:
                    log.warning("dropping chain queue=%d head=%d: %d-byte request", queue,
                                head, len(prefix))
                    self.complete_now(vring, head, 0)
                    continue
                in_len, opcode, unique, nodeid = IN_PREFIX.unpack_from(prefix)
                if len(prefix) >= ROUTE_BYTES:
                    fh = _FH.unpack_from(prefix, IN_SIZE)[0]
            if opcode in _SUPERVISOR_OPS:
                self._flush(batches, queue)
                batches = {}
                self.serve_here(vring, head, opcode)
                continue
            if opcode in _FH_OPCODES and fh >= 0:
                owner = fh_owner(fh)
                if not (0 <= owner < nslots) or slots[owner].process is None:
                    self.reply_error(vring, head, unique, errno.EBADF)
                    continue
                if opcode == _WRITE:
                    io = in_len - IN_SIZE
                if io >= _LEND_MIN and nslots > 1 and fh_lendable(fh):
                    # A busy owner's large READ/WRITE goes to the least-loaded worker, which
                    # borrows the fd (workers/passthrough/handles.py): one open file can
                    # then keep several workers copying.
                    best = min(loads)
                    if best < loads[owner]:
                        owner = loads.index(best)
            else:
                best = min(loads)  # the least-loaded live worker, ties taken in turn
                if best >= _DEAD:
                    self.reply_error(vring, head, unique, errno.EIO)
                    continue
                if nslots == 1:
                    owner = 0
                else:
                    self.rr = rr = (self.rr + 1) % nslots
                    owner = loads.index(best, rr) if best in loads[rr:] else loads.index(best)
            loads[owner] += 1
            slot = slots[owner]
            slot.inflight[queue << 16 | head] = (opcode, nodeid, unique, now)
            pending[head] = owner + 1  # only this worker may return the chain
            # pack_request(queue, head, epoch), inlined: this loop runs once per request
            record = queue | head << 16 | (slot.channel.epoch & 0xFFFFFFFF) << 32
            if idle[owner]:
                # An idle worker gets its first request at once: its wake-up then overlaps
                # the routing of the rest (no extra wake: it is awake for the others).
                idle[owner] = False
                self._flush({owner: [record]}, queue)
                continue
            batch = batches.get(owner)
            if batch is None:
                batches[owner] = [record]
            else:
                batch.append(record)
        self._flush(batches, queue)

    def _flush(self, batches: dict[int, list[int]], queue: int) -> None:
        assert self.pool is not None
        for owner, records in batches.items():
            channel = self.pool.slots[owner].channel
            try:
                channel.requests.push(records)
            except RingFull:  # cannot happen while ring capacity >= all queue sizes
                log.error("worker %d ring full; failing %d requests", owner, len(records))
                raise
            channel.requests.wake_if_sleeping(channel.doorbell)

    # requests the supervisor serves itself
    def serve_here(self, vring: Vring, head: int, opcode: int) -> None:
        if opcode in _HIPRIO_OPS:  # rarely on a request queue (READDIRPLUS error paths)
            self.serve_hiprio(vring, [head])
        elif opcode == abi.Opcode.INIT:
            self.serve_init(vring, head)
        elif opcode == abi.Opcode.DESTROY:
            self.serve_destroy(vring, head)

