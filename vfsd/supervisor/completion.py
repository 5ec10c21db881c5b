"""Answering requests on request queues: replies written by the supervisor, the move of
workers' completions to the used rings, and the quiesce barrier."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time

from vfsd.dispatch import control
from vfsd.dispatch.ring import unpack_completion
from vfsd.fuse import abi
from vfsd.supervisor.state import SupervisorState
from vfsd.transport import GuestProtocolError
from vfsd.transport.virtqueue import Vring, read_chain

log = logging.getLogger("vfsd.supervisor")

QUIESCE_TIMEOUT = 30.0


def write_reply(writable: list[memoryview], data: bytes) -> int:
    """Copy `data` into the chain's writable part; returns bytes written."""
    pos = 0
    for view in writable:
        if pos >= len(data):
            break
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
    return pos



class Completion(SupervisorState):
    def reply_error(self, vring: Vring, head: int, unique: int, err: int) -> None:
        """Answer a request from the supervisor (header-only reply, -err)."""
        assert self.mem is not None
        written = 0
        try:
            chain = read_chain(self.mem, vring.desc_gpa, vring.size, head)
            written = write_reply(chain.writable, abi.OUT_HEADER.pack(16, -err, unique))
        except GuestProtocolError as e:
            log.warning("cannot answer head=%d: %s", head, e)
        self.complete_now(vring, head, written)

    def complete_now(self, vring: Vring, head: int, length: int) -> None:
        if not vring.mapped:
            log.warning("dropping completion head=%d for unmapped queue %d", head, vring.index)
            return
        vring.push_used(head, length)
        if vring.needs_notification():
            vring.notify()

    # completions
    def drain_completions(self) -> None:
        """Move every worker's completions to the used rings; one `used.idx` store and at
        most one interrupt per queue per call."""
        assert self.pool is not None
        # A completion record is queue | head << 16 | length << 32 (pack_completion), and
        # (head | length << 32) is the used element: decoded by comprehensions, per batch.
        per_queue: dict[int, list[int]] = {}
        for slot in self.pool.slots:
            records = slot.channel.completions.pop_all()
            if not records:
                continue
            pop = slot.inflight.pop
            answered = [pop((r & 0xFFFF) << 16 | r >> 16 & 0xFFFF, None) for r in records]
            if None in answered:
                # Already answered (EIO after a stuck quiesce): never use a head twice.
                for r, entry in zip(records, answered, strict=True):
                    if entry is None:
                        queue, head, _length = unpack_completion(r)
                        log.warning("dropping late completion queue=%d head=%d", queue, head)
                records = [r for r, entry in zip(records, answered, strict=True)
                           if entry is not None]
            queues = {r & 0xFFFF for r in records}
            for queue in queues:
                mine = records if len(queues) == 1 else [r for r in records
                                                         if r & 0xFFFF == queue]
                per_queue.setdefault(queue, []).extend(
                    [r >> 16 & 0xFFFF | r >> 32 << 32 for r in mine])
        if not per_queue or self.backend is None:
            return
        for queue, elems in per_queue.items():
            vring = self.backend.vrings[queue]
            if not vring.mapped:
                log.warning("dropping %d completions for stopped queue %d", len(elems), queue)
                continue
            vring.push_used_elems(elems)
            if vring.needs_notification():
                vring.notify()

    def quiesce(self, selects) -> None:
        """Wait until no in-flight request matches `selects(queue << 16 | head)`."""
        assert self.pool is not None
        for slot in self.pool.live():  # a waiting SETLKW must not hold the barrier
            if any(selects(k) for k in slot.inflight):
                slot.channel.send({"kind": control.CANCEL_DEFERRED})
        deadline = time.monotonic() + QUIESCE_TIMEOUT
        while True:
            self.drain_completions()
            pending = [s for s in self.pool.slots if any(selects(k) for k in s.inflight)]
            if not pending:
                return
            for slot in pending:
                if slot.process is not None and not slot.process.is_alive():
                    self.handle_worker_exit(slot)
            if time.monotonic() > deadline:
                log.error("requests still in flight after %.0f s; answering them EIO",
                          QUIESCE_TIMEOUT)
                for slot in pending:
                    self._fail_inflight(slot)
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.completion_doorbell)  # level-reset for select()
            select.select([self.completion_doorbell], [], [], 0.01)

