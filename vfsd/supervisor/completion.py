"""Answering requests on request queues: replies written by the supervisor, the move of
workers' completions to the used rings, and the quiesce barrier."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time

from vfsd.dispatch import control
from vfsd.fuse import abi
from vfsd.supervisor.state import SupervisorState
from vfsd.transport import GuestProtocolError
from vfsd.transport.virtqueue import Vring, read_chain

log = logging.getLogger("vfsd.supervisor")

# How long a barrier (INIT, DESTROY, GET_VRING_BASE) waits for a request before the worker
# running it is killed; tests shorten it through the environment.
QUIESCE_TIMEOUT = float(os.environ.get("VFSD_QUIESCE_TIMEOUT", "30"))


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
    def reply_error(self, vring: Vring, head: int, unique: int, err: int, owner: int = 0
                    ) -> None:
        """Answer a request from the supervisor (header-only reply, -err). `owner`: the
        worker (index + 1) the head was routed to, when answering for a dead one."""
        assert self.mem is not None
        written = 0
        try:
            chain = read_chain(self.mem, vring.desc_gpa, vring.size, head)
            written = write_reply(chain.writable, abi.OUT_HEADER.pack(16, -err, unique))
        except GuestProtocolError as e:
            log.warning("cannot answer head=%d: %s", head, e)
        self.complete_now(vring, head, written, owner)

    def complete_now(self, vring: Vring, head: int, length: int, owner: int = 0) -> None:
        """Return one chain the supervisor answered (see `complete_heads`)."""
        self.complete_heads(vring, [head], [length], owner)

    def complete_heads(self, vring: Vring, heads: list[int], lengths: list[int],
                       owner: int = 0) -> None:
        """Return chains the supervisor answered. On a request queue they go through the
        shared used-ring writer (workers write that ring too, so the supervisor's Vring
        does not know used.idx); on the hiprio queue the supervisor is the only writer."""
        if not vring.mapped:
            log.warning("dropping %d completions for unmapped queue %d", len(heads),
                        vring.index)
            return
        writer = self.used.get(vring.index)
        if writer is None:
            vring.push_used_batch(list(zip(heads, lengths, strict=True)))
            if vring.needs_notification():
                vring.notify()
            return
        elems = [h | n << 32 for h, n in zip(heads, lengths, strict=True)]
        if writer.complete(elems, heads, owner) != len(heads):
            log.warning("queue %d: some of heads %s were already answered", vring.index,
                        heads[:8])

    def drain_completions(self) -> None:
        """Read the workers' completion records: the requests they have returned to the
        guest leave the in-flight table (routing load, status, recovery)."""
        assert self.pool is not None
        for slot in self.pool.slots:
            records = slot.channel.completions.pop_all()
            if records:
                # A completion record is queue | head << 16 | length << 32 (pack_completion).
                pop = slot.inflight.pop
                for r in records:
                    pop((r & 0xFFFF) << 16 | r >> 16 & 0xFFFF, None)

    def recover_used(self) -> None:
        """After a worker died: a used-ring lock it held is recovered and its journaled
        update finished (robust mutex), before its requests are answered or replayed."""
        for writer in self.used.values():
            writer.recover()

    def quiesce(self, selects) -> None:
        """Wait until no in-flight request matches `selects(queue << 16 | head)`. A worker
        still running one after QUIESCE_TIMEOUT is killed (so it can never write the used
        ring late) and handled as a dead worker: replay or EIO."""
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
                for slot in pending:
                    if slot.process is not None:
                        log.error("worker %d still runs requests after %.0f s; killing it",
                                  slot.index, QUIESCE_TIMEOUT)
                        self.pool.kill(slot)
                        self.handle_worker_exit(slot)
                    else:
                        self._fail_inflight(slot)
                deadline = time.monotonic() + QUIESCE_TIMEOUT  # for what was replayed
                continue
            # Ask the workers to ring once they push a completion, then wait for it.
            ready = all([s.channel.completions.prepare_sleep() for s in pending])
            if ready:
                select.select([self.completion_doorbell], [], [], 0.01)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.completion_doorbell)
            for slot in pending:
                slot.channel.completions.cancel_sleep()
