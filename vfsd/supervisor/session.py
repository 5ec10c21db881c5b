"""The FUSE session barriers: INIT and DESTROY, served by the supervisor while no worker
runs a request."""

from __future__ import annotations

import errno
import logging
import struct

from vfsd.dispatch import control
from vfsd.fuse import abi
from vfsd.fuse.init import negotiate
from vfsd.supervisor.completion import write_reply
from vfsd.supervisor.state import SupervisorState
from vfsd.supervisor.wire import IN_PREFIX, IN_SIZE
from vfsd.transport import GuestProtocolError
from vfsd.transport.virtqueue import Vring, peek_chain, read_chain

log = logging.getLogger("vfsd.supervisor")


class SessionBarriers(SupervisorState):
    def serve_init(self, vring: Vring, head: int) -> None:
        assert self.mem is not None and self.pool is not None
        self.quiesce(lambda key: True)
        try:
            chain = read_chain(self.mem, vring.desc_gpa, vring.size, head)
            request = b"".join(bytes(v) for v in chain.readable)[: 40 + abi.INIT_IN.size]
            if len(request) < IN_SIZE:  # the guest rewrote the chain since it was routed
                raise GuestProtocolError(f"{len(request)}-byte INIT")
        except GuestProtocolError as e:
            log.warning("dropping INIT head=%d: %s", head, e)
            self.complete_now(vring, head, 0)
            return
        _len, _op, unique, _nodeid = IN_PREFIX.unpack_from(request)
        if self.session is not None:  # a new INIT ends the previous session
            self._destroy_session()
        try:
            body, session = negotiate(request[40:], self.options)
        except OSError as e:
            self.reply_error(vring, head, unique, e.errno or errno.EPROTO)
            return
        self.session = session.to_dict()
        for slot in self.pool.live():
            slot.channel.send({"kind": control.SESSION, "session": self.session})
        reply = abi.OUT_HEADER.pack(16 + len(body), 0, unique) + body
        self.complete_now(vring, head, write_reply(chain.writable, reply))
        log.info("FUSE session started", extra={"fields": {
            "minor": session.minor, "max_write": session.max_write}})

    def serve_destroy(self, vring: Vring, head: int) -> None:
        self.quiesce(lambda key: True)
        self._destroy_session()
        assert self.mem is not None
        try:
            prefix = peek_chain(self.mem, vring.desc_gpa, vring.size, head, IN_SIZE)
            unique = IN_PREFIX.unpack_from(prefix)[2]
        except (GuestProtocolError, struct.error) as e:  # rewritten since it was routed
            log.warning("dropping DESTROY head=%d: %s", head, e)
            self.complete_now(vring, head, 0)
        else:
            self.reply_error(vring, head, unique, 0)
        log.info("FUSE session destroyed")

    def _destroy_session(self) -> None:
        assert self.pool is not None and self.table is not None
        for slot in self.pool.live():
            slot.channel.send({"kind": control.DESTROY})
        self.table.clear()
        self.session = None

