"""vhost-user back-end state machine (`VhostUserBackend.handle`/`reject`) driven by a front-end
byte stream, with guest-RAM writes and ring processing in between.

Input: events until the input ends, each starting with a kind byte:
- kind % 4 in (0, 1): a frame: 12 header bytes, `size` payload bytes (as the header says), then
  `u8 fds` = number of fds (low nibble) and their kind (0x10: dups of the guest-RAM memfd,
  else eventfds). Handled as the supervisor does: `decode`, then `handle`, or `reject` for a
  payload that does not decode; a `FramingError` ends the session.
- kind % 4 == 2: a kick: every ready ring is processed (pop, walk, echo readable into
  writable, push used, notify).
- kind % 4 == 3: the guest writes `u16 length` bytes at file offset `u32` of its RAM.

Documented errors: none from `handle` (it never raises for front-end input); the codec's
`VhostUserProtocolError`; `VringError`/`ChainError` from the rings. Invariants: replies are
well-formed (flags 0x5, the request's code, 8-byte payload), the implemented GETs are always
answered, everything else only when REPLY_ACK is on and NEED_REPLY set; the used index in
guest memory is what the ring wrote; after `close()` no fd is left open.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from tests.fuzz.harness import Broken, Reader, Writer, open_fds
from vfsd.transport import FramingError, GuestProtocolError, VhostUserProtocolError
from vfsd.transport.abi import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    PROTOCOL_F_REPLY_ACK,
    REPLY_FLAGS,
    U64,
    VhostUserRequest,
)
from vfsd.transport.backend import VhostUserBackend
from vfsd.transport.codec import decode
from vfsd.transport.memory import GuestMemory
from vfsd.transport.virtqueue import Vring, read_chain

R = VhostUserRequest
MAX_LEN = 16384
RAM_SIZE = 1 << 20
KICK, GUEST_WRITE = 2, 3
MEMFD_FDS = 0x10
ANSWERED = frozenset({R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
                      R.GET_MAX_MEM_SLOTS, R.GET_VRING_BASE})


class EchoDevice:
    """The supervisor's part in miniature: every chain is answered at once by copying its
    readable bytes into its writable part."""

    def __init__(self) -> None:
        self.mem: GuestMemory | None = None
        self.rings: list[Vring] = []

    def memory_changed(self, mem: GuestMemory) -> None:
        self.mem = mem

    def queue_started(self, vring: Vring) -> None:
        if vring not in self.rings:
            self.rings.append(vring)
        self.process(vring)

    def queue_enabled(self, vring: Vring, enabled: bool) -> None:
        if enabled and vring.started:
            self.process(vring)

    def queue_stopping(self, vring: Vring) -> None:
        """Nothing is ever in flight: chains are answered when popped."""

    def kick_fd_changed(self, vring: Vring, old_fd: int | None) -> None:
        """The harness kicks by processing every ring; no fd is watched."""

    def call_fd_changed(self, vring: Vring) -> None:
        """`notify` reads `vring.call_fd` when it signals."""

    def process(self, vring: Vring) -> None:
        if not vring.ready or self.mem is None:
            return
        try:
            heads = vring.pop_avail()
        except GuestProtocolError:
            return  # a broken ring: the supervisor logs it and waits for the next kick
        for head in heads:
            written = 0
            try:
                chain = read_chain(self.mem, vring.desc_gpa, vring.size, head)
                data = b"".join(chain.readable)
                for view in chain.writable:
                    n = min(len(view), len(data) - written)
                    view[:n] = data[written:written + n]
                    written += n
            except GuestProtocolError:
                pass
            vring.push_used(head, written)
            in_memory = self.mem.view(vring.used_gpa + 2, 2).cast("H")[0]
            if in_memory != vring.used_idx:
                raise Broken(f"queue {vring.index}: used.idx {in_memory} in memory, "
                             f"{vring.used_idx} pushed")
        if heads and vring.needs_notification():
            vring.notify()

    def kick_all(self) -> None:
        for vring in self.rings:
            self.process(vring)


def _check_reply(request: int, flags: int, reply: bytes | None, backend: VhostUserBackend,
                 decoded: bool) -> None:
    acking = bool(flags & 0x8 and backend.acked_protocol_features & PROTOCOL_F_REPLY_ACK)
    always = decoded and request in ANSWERED
    if reply is None:
        if always or acking:
            raise Broken(f"request {request} flags {flags:#x}: no reply")
        return
    if not (always or acking):
        raise Broken(f"request {request} flags {flags:#x}: unsolicited reply {reply.hex()}")
    got, got_flags, size = HEADER.unpack_from(reply)
    if got != request or got_flags != REPLY_FLAGS or size != 8 or len(reply) != 20:
        raise Broken(f"request {request}: malformed reply {reply.hex()}")
    if acking and not always and U64.unpack_from(reply, 12)[0] not in (0, 1):
        raise Broken(f"request {request}: ack value {reply[12:].hex()}")


def one_input(data: bytes) -> None:
    before = open_fds()
    ram = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, RAM_SIZE)
    device = EchoDevice()
    backend = VhostUserBackend(device, num_queues=3)
    r = Reader(data)
    try:
        while r.left:
            kind = r.u8() % 4
            if kind == KICK:
                device.kick_all()
                continue
            if kind == GUEST_WRITE:
                offset = r.u32() % RAM_SIZE
                os.pwrite(ram, r.take(min(r.u16(), r.left, RAM_SIZE - offset)), offset)
                continue
            header = r.take(HEADER_SIZE)
            size = HEADER.unpack(header)[2]
            payload = r.take(min(size, MAX_PAYLOAD_SIZE + 1))
            fd_spec = r.u8()
            fds = [os.dup(ram) if fd_spec & MEMFD_FDS else os.eventfd(0, os.EFD_CLOEXEC)
                   for _ in range(fd_spec & 0x0F)]
            request, flags = HEADER.unpack(header)[:2]
            try:
                message = decode(header, payload, fds)
            except FramingError:
                break  # the supervisor drops the connection
            except VhostUserProtocolError as e:
                _check_reply(request, flags, backend.reject(header, str(e)), backend, False)
                continue
            _check_reply(request, flags, backend.handle(message), backend, True)
    finally:
        backend.close()
        os.close(ram)
    if leaked := open_fds() - before:
        raise Broken(f"fds left open after close(): {sorted(leaked)}")


def encode(events: list[tuple[str, bytes, int]]) -> bytes:
    """Seed layout for recorded front-end events (see frontend_trace.py)."""
    w = Writer()
    memfd_requests = {R.SET_MEM_TABLE, R.ADD_MEM_REG}
    for kind, data, n in events:
        if kind == "kick":
            w.u8(KICK)
        elif kind == "guest":
            w.u8(GUEST_WRITE).u32(n).u16(len(data)).raw(data)
        else:
            fd_kind = MEMFD_FDS if HEADER.unpack_from(data)[0] in memfd_requests else 0
            w.u8(0).raw(data).u8(n | fd_kind)
    return w.getvalue()


def seeds() -> Iterator[bytes]:
    from tests.fuzz.frontend_trace import record_session

    events = record_session()
    yield encode(events)
    frames = [e for e in events if e[0] == "frame"]
    yield encode(frames)  # the handshake alone
    start = next(i for i, e in enumerate(events) if e[0] == "guest")
    yield encode(events[:start + 2])
