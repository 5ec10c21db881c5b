"""vhost-user back-end state machine for a virtio-fs device (rust-vmm `handler.rs` style).

`VhostUserBackend.handle(message) -> reply bytes | None` is the whole interface: no socket
I/O here (connection.py reads and writes frames). One method per request; which request is
legal when, and how it is answered, is the `RULES` table. The virtio-fs specifics (routing,
workers, completing in-flight requests) sit behind the `VirtioFsDevice` protocol.

Reply policy (PROTOCOLS.md A.1, trap 10):
* GET_* requests are always answered, exactly once (NEED_REPLY is ignored for them).
* Everything else is acked (u64 0 = ok, 1 = failed) only when REPLY_ACK was negotiated and the
  request has NEED_REPLY. Never an unsolicited reply: QEMU reads replies synchronously.
* A request the front-end got wrong (illegal now, bad index, bad address) or that we do not
  support is logged and leaves the state unchanged; `handle` never raises for it, so one bad
  message cannot kill the daemon. The failure shows in the ack when one was requested.

fds: `handle` owns `message.fds` and closes all of them before returning; what a ring keeps
(kick/call/err) is a dup, and `GuestMemory` keeps its own dup of every region fd.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from vfsd.transport import GuestProtocolError, VhostUserProtocolError
from vfsd.transport.abi import (
    PROTOCOL_F_CONFIGURE_MEM_SLOTS,
    PROTOCOL_F_MQ,
    PROTOCOL_F_REPLY_ACK,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VhostUserRequest,
)
from vfsd.transport.codec import (
    AddMemReg,
    RawPayload,
    RemMemReg,
    SetMemTable,
    U64Payload,
    VhostUserMessage,
    VringAddr,
    VringFile,
    VringState,
    close_fds,
    encode_ack,
    encode_state_reply,
    encode_u64_reply,
    parse_header,
)
from vfsd.transport.memory import GuestMemory
from vfsd.transport.virtqueue import Vring

log = logging.getLogger("vfsd.transport.backend")

R = VhostUserRequest

# What we offer (A.3). Never RING_PACKED, ACCESS_PLATFORM, LOG_ALL, protocol CONFIG/STATUS/
# SLAVE_REQ: unimplemented, and Linux 6.1 or QEMU 7.2 would use them (trap 12).
OFFERED_FEATURES = (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
                    | VHOST_USER_F_PROTOCOL_FEATURES)
OFFERED_PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIGURE_MEM_SLOTS
# Memory slots we accept with CONFIGURE_MEM_SLOTS. QEMU uses min(this, 256 on x86) and a pc
# machine needs ~2; 32 keeps every region fd forwardable to a worker in one SCM_RIGHTS
# message (the kernel's limit is 253 fds).
DEFAULT_MAX_MEM_SLOTS = 32


class VirtioFsDevice(Protocol):
    """What the back-end needs from the device (the supervisor implements it).

    Every callback runs synchronously inside `VhostUserBackend.handle`, on the thread that
    calls it, before the reply to that message is produced.
    """

    def memory_changed(self, mem: GuestMemory) -> None:
        """The memory table changed (SET_MEM_TABLE, ADD/REM_MEM_REG). `mem` is the same object
        every time; rings are already remapped. Forward `mem.regions()` to workers before any
        request that may depend on them."""

    def queue_started(self, vring: Vring) -> None:
        """SET_VRING_KICK: the ring is started (addresses set) with `vring.kick_fd` (None =
        no fd: poll the ring). Watch the kick fd; consume only while `vring.enabled`."""

    def queue_enabled(self, vring: Vring, enabled: bool) -> None:
        """SET_VRING_ENABLE, or SET_FEATURES without bit 30 (all rings enabled). When enabled
        and started, rescan the ring: kicks may have arrived while it was disabled (trap 6)."""

    def queue_stopping(self, vring: Vring) -> None:
        """GET_VRING_BASE (also RESET_DEVICE/RESET_OWNER) on a started ring, before the reply
        is computed: complete every in-flight request of this ring into the used ring (and
        notify), and stop watching `vring.kick_fd`. Afterwards the back-end closes kick and
        call fds and answers `last_avail_idx` (trap 7)."""

    def kick_fd_changed(self, vring: Vring, old_fd: int | None) -> None:
        """SET_VRING_KICK on a ring that already had a kick fd: stop watching `old_fd` (still
        open during the call, closed right after); `queue_started` follows for the new one."""

    def call_fd_changed(self, vring: Vring) -> None:
        """SET_VRING_CALL: `vring.call_fd` is new (None = don't signal); the old one is closed.
        Processes that signal the guest themselves need the new fd."""


class Reply(Enum):
    ACK = "ack"  # only with REPLY_ACK negotiated and NEED_REPLY set
    ALWAYS = "always"  # GET_*: answered every time


@dataclass(frozen=True, slots=True)
class Rule:
    """When a request is legal and how it is answered."""

    handler: str
    reply: Reply = Reply.ACK
    owner: bool = False  # SET_OWNER must have been received
    protocol: int = 0  # protocol feature that must have been negotiated
    feature: int = 0  # virtio feature that must have been acked
    stopped_ring: bool = False  # the addressed ring must not be started


RULES: dict[int, Rule] = {
    R.GET_FEATURES: Rule("get_features", Reply.ALWAYS),
    R.SET_FEATURES: Rule("set_features", owner=True),
    R.SET_OWNER: Rule("set_owner"),
    R.RESET_OWNER: Rule("reset_owner"),
    R.GET_PROTOCOL_FEATURES: Rule("get_protocol_features", Reply.ALWAYS),
    R.SET_PROTOCOL_FEATURES: Rule("set_protocol_features"),
    R.GET_QUEUE_NUM: Rule("get_queue_num", Reply.ALWAYS, protocol=PROTOCOL_F_MQ),
    R.GET_MAX_MEM_SLOTS: Rule("get_max_mem_slots", Reply.ALWAYS,
                              protocol=PROTOCOL_F_CONFIGURE_MEM_SLOTS),
    R.SET_MEM_TABLE: Rule("set_mem_table", owner=True),
    R.ADD_MEM_REG: Rule("add_mem_reg", owner=True, protocol=PROTOCOL_F_CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: Rule("rem_mem_reg", owner=True, protocol=PROTOCOL_F_CONFIGURE_MEM_SLOTS),
    R.SET_VRING_NUM: Rule("set_vring_num", owner=True, stopped_ring=True),
    R.SET_VRING_BASE: Rule("set_vring_base", owner=True, stopped_ring=True),
    R.SET_VRING_ADDR: Rule("set_vring_addr", owner=True, stopped_ring=True),
    R.GET_VRING_BASE: Rule("get_vring_base", Reply.ALWAYS, owner=True),
    R.SET_VRING_KICK: Rule("set_vring_kick", owner=True),
    R.SET_VRING_CALL: Rule("set_vring_call", owner=True),
    R.SET_VRING_ERR: Rule("set_vring_err", owner=True),
    R.SET_VRING_ENABLE: Rule("set_vring_enable", owner=True,
                             feature=VHOST_USER_F_PROTOCOL_FEATURES),
    R.RESET_DEVICE: Rule("reset_device"),
}
"""Every request we implement. Others (log, config, inflight, slave channel, status, ...) are
refused: logged, and a failure ack if one was asked for."""


class VhostUserBackend:
    """Protocol state of one front-end connection: features, memory table, rings."""

    def __init__(self, device: VirtioFsDevice, *, num_queues: int = 2,
                 max_queue_size: int = 1024, max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
                 features: int = OFFERED_FEATURES,
                 protocol_features: int = OFFERED_PROTOCOL_FEATURES) -> None:
        """`num_queues` = 1 hiprio + the request queues (QEMU `num-request-queues`)."""
        if not 1 <= num_queues <= 256:
            raise ValueError(f"num_queues {num_queues} not in 1..256")
        self.device = device
        self.features = features | VHOST_USER_F_PROTOCOL_FEATURES
        self.protocol_features = protocol_features
        self.max_mem_slots = max_mem_slots
        self.owned = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.mem = GuestMemory()
        self.vrings = [Vring(i, max_queue_size) for i in range(num_queues)]
        self.errors = 0  # requests refused or failed (for metrics)
        self.last_error: str | None = None

    @property
    def num_queues(self) -> int:
        return len(self.vrings)

    # -- entry point ---------------------------------------------------------------------------
    def handle(self, message: VhostUserMessage) -> bytes | None:
        """Apply one request; returns the reply frame to send, or None. Closes message.fds."""
        try:
            log.debug("vhost-user %s flags=%#x %s fds=%d", message.name, message.flags,
                      message.payload, len(message.fds))
            rule = RULES.get(message.request)
            if rule is None:
                return self._refuse(message, "request not supported")
            if rule.reply is Reply.ALWAYS:
                # A GET must be answered or QEMU hangs: a failed legality check is only logged
                # (before SET_OWNER no ring has state, so GET_VRING_BASE still answers right).
                try:
                    self._check(rule, message)
                except VhostUserProtocolError as e:
                    log.warning("vhost-user %s: %s (answered anyway)", message.name, e)
                reply: bytes = getattr(self, rule.handler)(message.payload)
                return reply
            try:
                self._check(rule, message)
                getattr(self, rule.handler)(message.payload)
            except GuestProtocolError as e:
                return self._refuse(message, str(e))
            return self._ack(message, ok=True)
        finally:
            close_fds(message.fds)

    def reject(self, header: bytes, reason: str) -> bytes | None:
        """A frame whose payload could not be decoded: count it, and fail the ack if asked."""
        request, flags, size = parse_header(header)
        stub = VhostUserMessage(request, flags, RawPayload(b""))
        return self._refuse(stub, f"{reason} ({size}-byte payload)")

    def _check(self, rule: Rule, message: VhostUserMessage) -> None:
        if rule.owner and not self.owned:
            raise VhostUserProtocolError("before SET_OWNER")
        if rule.protocol and not self.acked_protocol_features & rule.protocol:
            raise VhostUserProtocolError(f"protocol feature {rule.protocol:#x} not negotiated")
        if rule.feature and not self.acked_features & rule.feature:
            raise VhostUserProtocolError(f"feature {rule.feature:#x} not acked")
        if rule.stopped_ring:
            vring = self._vring(message.payload.index)  # type: ignore[union-attr]
            if vring.started:
                raise VhostUserProtocolError(f"queue {vring.index} is started")

    def _ack(self, message: VhostUserMessage, ok: bool) -> bytes | None:
        if message.need_reply and self.acked_protocol_features & PROTOCOL_F_REPLY_ACK:
            return encode_ack(message.request, ok)
        return None

    def _refuse(self, message: VhostUserMessage, reason: str) -> bytes | None:
        self.errors += 1
        self.last_error = f"{message.name}: {reason}"
        log.error("vhost-user %s refused: %s", message.name, reason)
        return self._ack(message, ok=False)

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise VhostUserProtocolError(
                f"queue index {index} out of range: this back-end serves {len(self.vrings)} "
                f"queues (1 hiprio + {len(self.vrings) - 1} request queues)")
        return self.vrings[index]

    # -- features ------------------------------------------------------------------------------
    def get_features(self, _payload: None) -> bytes:
        return encode_u64_reply(R.GET_FEATURES, self.features)

    def set_features(self, payload: U64Payload) -> None:
        features = payload.value
        if features & ~self.features:
            raise VhostUserProtocolError(f"features {features:#x} were not offered "
                                         f"({self.features:#x})")
        self.acked_features = features
        event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)
        for vring in self.vrings:
            vring.event_idx = event_idx
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            # Without bit 30 rings start enabled (spec "Ring states"; rust-vmm set_features).
            for vring in self.vrings:
                self._set_enabled(vring, True)

    def get_protocol_features(self, _payload: None) -> bytes:
        return encode_u64_reply(R.GET_PROTOCOL_FEATURES, self.protocol_features)

    def set_protocol_features(self, payload: U64Payload) -> None:
        # Legal before SET_FEATURES: bit 30 only has to be offered (rust-vmm note).
        if payload.value & ~self.protocol_features:
            raise VhostUserProtocolError(f"protocol features {payload.value:#x} were not "
                                         f"offered ({self.protocol_features:#x})")
        self.acked_protocol_features = payload.value

    def get_queue_num(self, _payload: None) -> bytes:
        return encode_u64_reply(R.GET_QUEUE_NUM, len(self.vrings))

    def get_max_mem_slots(self, _payload: None) -> bytes:
        return encode_u64_reply(R.GET_MAX_MEM_SLOTS, self.max_mem_slots)

    # -- session -------------------------------------------------------------------------------
    def set_owner(self, _payload: None) -> None:
        if self.owned:
            log.warning("vhost-user SET_OWNER again; ignored")
        self.owned = True

    def reset_owner(self, _payload: None) -> None:
        """Deprecated; QEMU 7.2 never sends it to fs. Reset like rust-vmm, keep the socket."""
        self._reset_rings()
        self.owned = False
        self.acked_features = 0
        self.acked_protocol_features = 0

    def reset_device(self, _payload: None) -> None:
        """Rings back to their initial state; memory table and protocol features stay."""
        self._reset_rings()
        self.acked_features = 0

    def _reset_rings(self) -> None:
        for vring in self.vrings:
            if vring.started:
                self.device.queue_stopping(vring)
            vring.reset()

    # -- memory --------------------------------------------------------------------------------
    def set_mem_table(self, payload: SetMemTable) -> None:
        self._unmap_rings()
        try:
            self.mem.set_regions(zip(payload.regions, payload.fds, strict=True))
        except GuestProtocolError:
            self._remap_rings()  # the old table is still in place
            raise
        self._memory_changed()

    def add_mem_reg(self, payload: AddMemReg) -> None:
        if len(self.mem) >= self.max_mem_slots:
            raise VhostUserProtocolError(f"all {self.max_mem_slots} memory slots in use")
        self.mem.add_region(payload.region, payload.fd)
        self._memory_changed()

    def rem_mem_reg(self, payload: RemMemReg) -> None:
        self._unmap_rings()
        try:
            self.mem.remove_region(payload.region)
        except GuestProtocolError:
            self._remap_rings()
            raise
        self._memory_changed()

    def _unmap_rings(self) -> None:
        # Ring views pin their mapping; dropping them first lets the old one go at once.
        for vring in self.vrings:
            vring.unmap()

    def _remap_rings(self) -> None:
        # Ring addresses are GPAs, so they survive any table change that keeps them mapped.
        for vring in self.vrings:
            if vring.size and vring.used_gpa and not vring.remap(self.mem) and vring.started:
                # Legal transiently (REM_MEM_REG then ADD_MEM_REG of the ring's region).
                log.warning("queue %d: ring not in guest memory after a table change; paused",
                            vring.index)

    def _memory_changed(self) -> None:
        self._remap_rings()
        self.device.memory_changed(self.mem)

    # -- rings ---------------------------------------------------------------------------------
    def set_vring_num(self, payload: VringState) -> None:
        self._vring(payload.index).set_size(payload.num)

    def set_vring_base(self, payload: VringState) -> None:
        self._vring(payload.index).set_base(payload.num)

    def set_vring_addr(self, payload: VringAddr) -> None:
        vring = self._vring(payload.index)
        if payload.flags & ~VHOST_VRING_F_LOG:
            raise VhostUserProtocolError(f"unknown vring address flags {payload.flags:#x}")
        if payload.flags & VHOST_VRING_F_LOG:
            raise VhostUserProtocolError("used-ring logging requested; LOG_ALL was not offered")
        # Ring addresses are QEMU virtual addresses; keep them as GPAs (A.7).
        vring.set_addresses(self.mem,
                            self.mem.va_to_gpa(payload.desc_user_addr),
                            self.mem.va_to_gpa(payload.avail_user_addr),
                            self.mem.va_to_gpa(payload.used_user_addr))

    def get_vring_base(self, payload: VringState) -> bytes:
        """Stop the ring and answer the next avail index (trap 7)."""
        try:
            vring = self._vring(payload.index)
        except VhostUserProtocolError as e:
            self.errors += 1
            log.error("vhost-user GET_VRING_BASE: %s; answering 0", e)
            return encode_state_reply(R.GET_VRING_BASE, payload.index, 0)
        if vring.started:
            self.device.queue_stopping(vring)  # completes in-flight requests first
        num = vring.last_avail_idx
        vring.stop()
        return encode_state_reply(R.GET_VRING_BASE, vring.index, num)

    def set_vring_kick(self, payload: VringFile) -> None:
        vring = self._vring(payload.index)
        if not vring.mapped:
            raise VhostUserProtocolError(f"queue {vring.index}: SET_VRING_KICK before the ring "
                                         "is placed (SET_VRING_NUM + SET_VRING_ADDR)")
        old = vring.replace_kick_fd(_dup(payload.fd))
        if old is not None:
            self.device.kick_fd_changed(vring, old)
            os.close(old)
        vring.started = True
        vring.signalled_used_valid = False
        self.device.queue_started(vring)

    def set_vring_call(self, payload: VringFile) -> None:
        vring = self._vring(payload.index)
        old = vring.replace_call_fd(_dup(payload.fd))
        if old is not None:
            os.close(old)
        self.device.call_fd_changed(vring)

    def set_vring_err(self, payload: VringFile) -> None:
        vring = self._vring(payload.index)
        old = vring.replace_err_fd(_dup(payload.fd))
        if old is not None:
            os.close(old)

    def set_vring_enable(self, payload: VringState) -> None:
        vring = self._vring(payload.index)
        if payload.num not in (0, 1):
            raise VhostUserProtocolError(f"SET_VRING_ENABLE value {payload.num}")
        self._set_enabled(vring, bool(payload.num))

    def _set_enabled(self, vring: Vring, enabled: bool) -> None:
        if vring.enabled != enabled:
            vring.enabled = enabled
            self.device.queue_enabled(vring, enabled)

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Connection gone: close ring fds and unmap guest memory (no device callbacks)."""
        for vring in self.vrings:
            vring.close()
        self.mem.close()


def _dup(fd: int | None) -> int | None:
    return None if fd is None else os.dup(fd)
