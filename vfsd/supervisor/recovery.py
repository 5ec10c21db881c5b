"""A dead worker: reap, replay what changes nothing, answer the rest EIO, respawn."""

from __future__ import annotations

import errno
import logging

from vfsd.dispatch.ring import pack_request
from vfsd.fuse import abi
from vfsd.pool import WorkerSlot
from vfsd.supervisor.state import SupervisorState
from workers.passthrough.handles import LENDING

log = logging.getLogger("vfsd.supervisor")

# Requests that change nothing: a dead worker's ones run again on its successor.
_REPLAYABLE = frozenset(int(op) for op in (
    abi.Opcode.GETATTR, abi.Opcode.READ, abi.Opcode.READDIR, abi.Opcode.STATFS,
    abi.Opcode.ACCESS, abi.Opcode.READLINK, abi.Opcode.GETXATTR, abi.Opcode.LISTXATTR,
    abi.Opcode.LSEEK, abi.Opcode.GETLK))


class Recovery(SupervisorState):
    def handle_worker_exit(self, slot: WorkerSlot) -> None:
        assert self.pool is not None
        sentinel = slot.sentinel
        if sentinel is not None and sentinel in self.sentinels:
            self.epoll.unregister(sentinel)
            del self.sentinels[sentinel]
        # Before the reap frees its pid: nobody may borrow the dead worker's fds by number.
        LENDING.orphan(slot.index)
        if self.pool.reap(slot) is None:
            log.error("worker %d closed its sentinel but did not exit; killing it", slot.index)
            self.pool.kill(slot)
            self.pool.reap(slot)
        # It can run no more: a used-ring lock it held is released, its published entries
        # kept; what it returned to the guest before dying leaves the in-flight table.
        self.recover_used()
        self.drain_completions()
        self._forget_answered(slot)
        replay = self._take_replayable(slot)
        self._fail_inflight(slot)
        if self.running:
            self.pool.spawn(slot)
            self._watch(slot)
            self._resync(slot)
            self._replay(slot, replay)
        else:
            slot.inflight.update(replay)
            self._fail_inflight(slot)

    def _forget_answered(self, slot: WorkerSlot) -> None:
        """Drop in-flight entries the dead worker did return to the guest (it died before
        pushing their completion records): their pending words are clear."""
        mine = slot.index + 1
        for key in list(slot.inflight):
            lock = self.used_locks.get(key >> 16)
            if lock is not None and lock.pending[key & 0xFFFF] != mine:
                del slot.inflight[key]

    def _take_replayable(self, slot: WorkerSlot) -> dict[int, tuple[int, int, int, int]]:
        """The dead worker's in-flight requests that may simply run again: those that
        change nothing (GETATTR, READ, READDIR, ...), each at most once, so a request that
        kills its worker cannot kill the next one too."""
        replay = {}
        if len(self._replayed) > 4096:
            self._replayed.clear()  # uniques only grow; this only forgets old ones
        for key, entry in list(slot.inflight.items()):
            opcode, _nodeid, unique, _t = entry
            if opcode in _REPLAYABLE and unique not in self._replayed:
                self._replayed.add(unique)
                replay[key] = entry
                del slot.inflight[key]
        return replay

    def _replay(self, slot: WorkerSlot, replay: dict[int, tuple[int, int, int, int]]) -> None:
        """Send requests back to the slot's new worker: it holds the dead one's reopened
        handles (fh ops) and may borrow other owners' fds (lent READs)."""
        if not replay:
            return
        epoch = slot.channel.epoch  # after _resync: the worker applies that first
        slot.inflight.update(replay)
        self._flush({slot.index: [pack_request(key >> 16, key & 0xFFFF, epoch)
                                  for key in replay]}, 0)
        log.warning("replayed %d requests of dead worker %d", len(replay), slot.index)

    def _fail_inflight(self, slot: WorkerSlot) -> None:
        """Requests a dead worker never answered get EIO (after the replayable ones were
        taken), through the used-ring writer in the worker's name: a head is returned once."""
        if self.backend is None:
            slot.inflight.clear()
            return
        for key, (_opcode, _nodeid, unique, _t) in list(slot.inflight.items()):
            vring = self.backend.vrings[key >> 16]
            if vring.mapped:
                self.reply_error(vring, key & 0xFFFF, unique, errno.EIO, slot.index + 1)
        slot.inflight.clear()

