"""The hiprio queue: FORGET and BATCH_FORGET on the shared inode table, INTERRUPT forwarded
to the worker that runs the request."""

from __future__ import annotations

import logging
import struct

from vfsd.dispatch import control
from vfsd.fuse import abi
from vfsd.supervisor.state import SupervisorState
from vfsd.supervisor.wire import IN_PREFIX
from vfsd.transport import GuestProtocolError
from vfsd.transport.virtqueue import Vring, peek_buffers, peek_chain

log = logging.getLogger("vfsd.supervisor")

MAX_BATCH_FORGET = 1 << 16
# A whole FORGET: in_header (len, opcode, unique, nodeid, 16 bytes unused) + nlookup.
_FORGET_REQ = struct.Struct("<IIQQ16xQ")
_FORGET = int(abi.Opcode.FORGET)


class Hiprio(SupervisorState):
    def serve_hiprio(self, vring: Vring, heads: list[int]) -> None:
        """FORGET / BATCH_FORGET: no reply; drop lookup counts in the shared table and tell
        every worker which nodeids were freed, so their cached fds close now."""
        assert self.mem is not None and self.table is not None
        mem = self.mem
        forget = self.table.forget
        desc_table = vring.desc_table
        used = []
        freed: list[int] = []
        for head in heads:
            try:
                found = peek_buffers(mem, desc_table, head) if desc_table is not None else None
                if found is not None and found[1] >= _FORGET_REQ.size:  # a FORGET, in place
                    _len, opcode, _unique, nodeid, nlookup = mem.unpack(_FORGET_REQ, found[0])
                    if opcode == _FORGET:
                        if forget(nodeid, nlookup):
                            freed.append(nodeid)
                        used.append((head, 0))
                        continue
                data = peek_chain(mem, vring.desc_gpa, vring.size, head, 48)
                _len, opcode, _unique, nodeid = IN_PREFIX.unpack_from(data)
                if opcode == abi.Opcode.FORGET:
                    if forget(nodeid, abi.FORGET_IN.unpack_from(data, 40)[0]):
                        freed.append(nodeid)
                elif opcode == abi.Opcode.BATCH_FORGET:
                    count = min(abi.BATCH_FORGET_IN.unpack_from(data, 40)[0], MAX_BATCH_FORGET)
                    data = peek_chain(self.mem, vring.desc_gpa, vring.size, head,
                                      48 + 16 * count)
                    count = (len(data) - 48) // 16
                    for i in range(count):
                        nodeid, nlookup = abi.FORGET_ONE.unpack_from(data, 48 + 16 * i)
                        if forget(nodeid, nlookup):
                            freed.append(nodeid)
                elif opcode == abi.Opcode.INTERRUPT:
                    self.forward_interrupt(abi.INTERRUPT_IN.unpack_from(data, 40)[0])
                else:
                    log.warning("unexpected opcode %d on hiprio queue", opcode)
            except (GuestProtocolError, struct.error) as e:
                log.warning("dropping hiprio chain head=%d: %s", head, e)
            used.append((head, 0))
        self.complete_heads(vring, [h for h, _n in used], [n for _h, n in used])
        if freed:
            self.tell_forgotten(freed)

    def tell_forgotten(self, nodeids: list[int]) -> None:
        assert self.pool is not None
        for slot in self.pool.live():
            channel = slot.channel
            channel.forgotten(nodeids)
            channel.requests.wake_if_sleeping(channel.doorbell)

    def forward_interrupt(self, unique: int) -> None:
        """Tell the worker running request `unique` to cancel it (a waiting SETLKW answers
        EINTR); an already finished request needs nothing (INTERRUPT has no reply)."""
        assert self.pool is not None
        for slot in self.pool.live():
            if any(entry[2] == unique for entry in slot.inflight.values()):
                slot.channel.send({"kind": control.INTERRUPT, "unique": unique})
                return

