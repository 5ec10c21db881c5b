"""vhost-user codec: bytes + fds in, typed messages out, and replies back to bytes. No I/O.

h11's shape: `decode()` turns one complete frame into a `VhostUserMessage`, `MessageReader`
frames an arbitrary byte stream (fed in any split, e.g. one byte at a time), and `encode_*`
build frames. Every defect of the input raises `VhostUserProtocolError` (a `FramingError` when
the stream can no longer be trusted). Payload checks follow rust-vmm `message.rs` `is_valid`.

fd ownership: on success every received fd is in `VhostUserMessage.fds` (the payloads point at
the ones they use) and belongs to the caller; on error `decode` closes them all.

Payload classes also `pack()` themselves, which is what the front-end (`vfsd.frontend`) uses.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vfsd.transport import FramingError, GuestMemoryError, VhostUserProtocolError
from vfsd.transport.abi import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    FLAG_VERSION_MASK,
    FLAGS_KNOWN,
    HEADER,
    HEADER_SIZE,
    MAX_FDS,
    MAX_MEM_TABLE_REGIONS,
    MAX_PAYLOAD_SIZE,
    MEM_REGION,
    MEM_TABLE_HEADER,
    REPLY_FLAGS,
    SINGLE_MEM_REGION,
    U64,
    VRING_ADDR,
    VRING_FILE_KNOWN,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    VRING_STATE,
    VhostUserRequest,
)
from vfsd.transport.memory import MemRegion

R = VhostUserRequest


# -- payloads --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class U64Payload:
    """SET_FEATURES, SET_PROTOCOL_FEATURES, and every u64 reply / ack."""

    value: int

    def pack(self) -> bytes:
        return U64.pack(self.value)


@dataclass(frozen=True, slots=True)
class VringState:
    """SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE (request and reply)."""

    index: int
    num: int

    def pack(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """SET_VRING_ADDR. The three ring addresses are front-end (QEMU) virtual addresses."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    def pack(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc_user_addr, self.used_user_addr,
                               self.avail_user_addr, self.log_guest_addr)


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: queue index and the eventfd (None with the NOFD bit)."""

    index: int
    nofd: bool
    fd: int | None

    def pack(self) -> bytes:
        return U64.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0))


@dataclass(frozen=True, slots=True)
class SetMemTable:
    """SET_MEM_TABLE: the whole table; `fds[i]` backs `regions[i]`."""

    regions: tuple[MemRegion, ...]
    fds: tuple[int, ...]

    def pack(self) -> bytes:
        return MEM_TABLE_HEADER.pack(len(self.regions), 0) + b"".join(
            _pack_region(r) for r in self.regions)


@dataclass(frozen=True, slots=True)
class AddMemReg:
    """ADD_MEM_REG: one region and its fd."""

    region: MemRegion
    fd: int

    def pack(self) -> bytes:
        return _pack_single_region(self.region)


@dataclass(frozen=True, slots=True)
class RemMemReg:
    """REM_MEM_REG: the region to drop (matched on gpa, userspace_addr and size)."""

    region: MemRegion

    def pack(self) -> bytes:
        return _pack_single_region(self.region)


@dataclass(frozen=True, slots=True)
class RawPayload:
    """Requests this back-end does not interpret (kept verbatim for logging)."""

    data: bytes

    def pack(self) -> bytes:
        return self.data


Payload = (U64Payload | VringState | VringAddr | VringFile | SetMemTable | AddMemReg | RemMemReg
           | RawPayload | None)


@dataclass(frozen=True, slots=True)
class VhostUserMessage:
    """One decoded front-end request. `request` is a VhostUserRequest when the id is known."""

    request: int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return self.request.name if isinstance(self.request, R) else f"UNKNOWN({self.request})"


def _pack_region(r: MemRegion) -> bytes:
    return MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)


def _pack_single_region(r: MemRegion) -> bytes:
    return SINGLE_MEM_REGION.pack(0, r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                  r.mmap_offset)


# -- payload readers (one per payload shape; the table below picks by request) ---------------
def _expect(request: int, data: bytes, fds: Sequence[int], size: int, nfds: int) -> None:
    if len(data) != size:
        raise VhostUserProtocolError(
            f"{_name(request)}: payload is {len(data)} bytes, expected {size}")
    if len(fds) != nfds:
        raise VhostUserProtocolError(f"{_name(request)}: {len(fds)} fds, expected {nfds}")


def _read_empty(request: int, data: bytes, fds: Sequence[int]) -> None:
    _expect(request, data, fds, 0, 0)
    return None


def _read_u64(request: int, data: bytes, fds: Sequence[int]) -> U64Payload:
    _expect(request, data, fds, U64.size, 0)
    return U64Payload(U64.unpack(data)[0])


def _read_state(request: int, data: bytes, fds: Sequence[int]) -> VringState:
    _expect(request, data, fds, VRING_STATE.size, 0)
    return VringState(*VRING_STATE.unpack(data))


def _read_addr(request: int, data: bytes, fds: Sequence[int]) -> VringAddr:
    _expect(request, data, fds, VRING_ADDR.size, 0)
    return VringAddr(*VRING_ADDR.unpack(data))


def _read_file(request: int, data: bytes, fds: Sequence[int]) -> VringFile:
    if len(data) != U64.size:
        raise VhostUserProtocolError(f"{_name(request)}: payload is {len(data)} bytes, expected 8")
    value = U64.unpack(data)[0]
    if value & ~VRING_FILE_KNOWN:
        raise VhostUserProtocolError(f"{_name(request)}: unknown bits in {value:#x}")
    nofd = bool(value & VRING_NOFD_MASK)
    if len(fds) != (0 if nofd else 1):  # rust-vmm: fd presence must match bit 8
        raise VhostUserProtocolError(
            f"{_name(request)}: {len(fds)} fds with NOFD={'set' if nofd else 'clear'}")
    return VringFile(value & VRING_IDX_MASK, nofd, None if nofd else fds[0])


def _region(fields: tuple[int, ...]) -> MemRegion:
    region = MemRegion(*fields)
    try:
        region.check()
    except GuestMemoryError as e:
        raise VhostUserProtocolError(str(e)) from e
    return region


def _read_mem_table(request: int, data: bytes, fds: Sequence[int]) -> SetMemTable:
    if len(data) < MEM_TABLE_HEADER.size:
        raise VhostUserProtocolError(f"SET_MEM_TABLE: payload is {len(data)} bytes")
    nregions, _padding = MEM_TABLE_HEADER.unpack_from(data)
    if nregions > MAX_MEM_TABLE_REGIONS:
        raise VhostUserProtocolError(f"SET_MEM_TABLE: {nregions} regions (max 8)")
    _expect(request, data, fds, MEM_TABLE_HEADER.size + MEM_REGION.size * nregions, nregions)
    regions = tuple(
        _region(MEM_REGION.unpack_from(data, MEM_TABLE_HEADER.size + MEM_REGION.size * i))
        for i in range(nregions))
    return SetMemTable(regions, tuple(fds))


def _read_add_region(request: int, data: bytes, fds: Sequence[int]) -> AddMemReg:
    _expect(request, data, fds, SINGLE_MEM_REGION.size, 1)
    return AddMemReg(_region(SINGLE_MEM_REGION.unpack(data)[1:]), fds[0])


def _read_rem_region(request: int, data: bytes, fds: Sequence[int]) -> RemMemReg:
    # The spec says REM_MEM_REG carries no fd, but a back-end should accept and close one.
    _expect(request, data, (), SINGLE_MEM_REGION.size, 0)
    if len(fds) > 1:
        raise VhostUserProtocolError(f"REM_MEM_REG: {len(fds)} fds, expected 0 or 1")
    return RemMemReg(_region(SINGLE_MEM_REGION.unpack(data)[1:]))


def _read_raw(request: int, data: bytes, fds: Sequence[int]) -> RawPayload:
    return RawPayload(bytes(data))


_Reader = Callable[[int, bytes, Sequence[int]], Payload]

READERS: dict[int, _Reader] = {
    R.GET_FEATURES: _read_empty,
    R.SET_FEATURES: _read_u64,
    R.SET_OWNER: _read_empty,
    R.RESET_OWNER: _read_empty,
    R.SET_MEM_TABLE: _read_mem_table,
    R.SET_VRING_NUM: _read_state,
    R.SET_VRING_ADDR: _read_addr,
    R.SET_VRING_BASE: _read_state,
    R.GET_VRING_BASE: _read_state,
    R.SET_VRING_KICK: _read_file,
    R.SET_VRING_CALL: _read_file,
    R.SET_VRING_ERR: _read_file,
    R.GET_PROTOCOL_FEATURES: _read_empty,
    R.SET_PROTOCOL_FEATURES: _read_u64,
    R.GET_QUEUE_NUM: _read_empty,
    R.SET_VRING_ENABLE: _read_state,
    R.RESET_DEVICE: _read_empty,
    R.GET_MAX_MEM_SLOTS: _read_empty,
    R.ADD_MEM_REG: _read_add_region,
    R.REM_MEM_REG: _read_rem_region,
}
"""Payload reader per request; anything else decodes to `RawPayload` (the back-end refuses it)."""


def _name(request: int) -> str:
    try:
        return R(request).name
    except ValueError:
        return f"UNKNOWN({request})"


# -- decoding --------------------------------------------------------------------------------
def parse_header(header: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Check a request header; returns (request, flags, size). Errors here are FramingErrors:
    the size field cannot be trusted, so neither can the rest of the stream."""
    if len(header) != HEADER_SIZE:
        raise FramingError(f"header is {len(header)} bytes, expected {HEADER_SIZE}")
    request, flags, size = HEADER.unpack(header)
    if flags & FLAG_VERSION_MASK != FLAG_VERSION:
        raise FramingError(f"{_name(request)}: bad version in flags {flags:#x}")
    if flags & ~FLAGS_KNOWN:
        raise FramingError(f"{_name(request)}: unknown flag bits {flags:#x}")
    if size > MAX_PAYLOAD_SIZE:
        raise FramingError(f"{_name(request)}: payload size {size} > {MAX_PAYLOAD_SIZE}")
    return request, flags, size


def decode(header: bytes | bytearray | memoryview, payload: bytes | bytearray | memoryview,
           fds: Sequence[int] = ()) -> VhostUserMessage:
    """One complete request frame -> message. Takes ownership of `fds` (closed on error)."""
    try:
        request, flags, size = parse_header(header)
        if flags & FLAG_REPLY:
            raise VhostUserProtocolError(f"{_name(request)}: REPLY flag set on a request")
        if len(payload) != size:
            raise FramingError(f"{_name(request)}: header says {size} bytes, got {len(payload)}")
        if len(fds) > MAX_FDS:
            raise VhostUserProtocolError(f"{_name(request)}: {len(fds)} fds (max {MAX_FDS})")
        data = bytes(payload)
        reader = READERS.get(request, _read_raw)
        body = reader(request, data, fds)
        try:
            request = R(request)
        except ValueError:
            pass
        return VhostUserMessage(request, flags, body, tuple(fds))
    except BaseException:
        close_fds(fds)
        raise


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class MessageReader:
    """Incremental framing: `feed(data, fds)` in any split, then `next_message()` until None.

    fds belong to the message containing the *last* byte of the chunk they came with: Linux
    ends a stream `recvmsg` right after the skb that carried them, and QEMU sends each message
    (with its fds) in one `sendmsg`. Reading header-first (see connection.py) delivers them
    with the header, which this rule also covers.

    A bad payload fails only its own message (`next_message` raises VhostUserProtocolError in
    stream order; later messages still decode). A bad header is a FramingError: the reader is
    broken from then on, like h11's ERROR state.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # stream offset of _buf[0]
        self._fd_marks: deque[tuple[int, list[int]]] = deque()  # (stream offset, fds)
        self._ready: deque[VhostUserMessage | VhostUserProtocolError] = deque()
        self._broken: FramingError | None = None

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Buffer bytes (and the fds received with them); takes ownership of `fds`."""
        if self._broken is not None:
            close_fds(fds)
            return
        if fds:
            end = self._pos + len(self._buf) + len(data)
            self._fd_marks.append((end - 1 if data else end, list(fds)))
        self._buf += data
        self._frame()

    def next_message(self) -> VhostUserMessage | None:
        """The next complete message, or None if more bytes are needed."""
        if self._ready:
            item = self._ready.popleft()
            if isinstance(item, VhostUserProtocolError):
                raise item
            return item
        if self._broken is not None:
            raise self._broken
        return None

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def close(self) -> None:
        """Drop buffered state and close every fd not yet handed out in a message."""
        for _pos, fds in self._fd_marks:
            close_fds(fds)
        self._fd_marks.clear()
        for item in self._ready:
            if isinstance(item, VhostUserMessage):
                close_fds(item.fds)
        self._ready.clear()
        self._buf.clear()

    def _frame(self) -> None:
        while len(self._buf) >= HEADER_SIZE:
            try:
                _request, _flags, size = parse_header(self._buf[:HEADER_SIZE])
            except FramingError as e:
                self._broken = e
                for _pos, fds in self._fd_marks:
                    close_fds(fds)
                self._fd_marks.clear()
                self._buf.clear()
                return
            total = HEADER_SIZE + size
            if len(self._buf) < total:
                return
            end = self._pos + total
            fds: list[int] = []
            while self._fd_marks and self._fd_marks[0][0] < end:
                fds += self._fd_marks.popleft()[1]
            frame = bytes(self._buf[:total])
            del self._buf[:total]
            self._pos = end
            try:
                self._ready.append(decode(frame[:HEADER_SIZE], frame[HEADER_SIZE:], fds))
            except VhostUserProtocolError as e:
                self._ready.append(e)


# -- encoding --------------------------------------------------------------------------------
def encode_request(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A front-end request frame (flags 0x1, or 0x9 when asking for an ack)."""
    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """A back-end reply: same request code, flags exactly 0x5."""
    return HEADER.pack(request, REPLY_FLAGS, len(payload)) + payload


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, U64.pack(value))


def encode_state_reply(request: int, index: int, num: int) -> bytes:
    return encode_reply(request, VRING_STATE.pack(index, num))


def encode_ack(request: int, ok: bool) -> bytes:
    """REPLY_ACK answer: u64 0 = success, non-zero = failure."""
    return encode_u64_reply(request, 0 if ok else 1)


def decode_reply(request: int, header: bytes, payload: bytes, *, size: int | None = None
                 ) -> bytes:
    """Front-end side: check a reply frame the way QEMU 7.2 does; returns the payload."""
    got_request, flags, got_size = HEADER.unpack(header)
    if got_request != request:
        raise VhostUserProtocolError(f"reply to {_name(got_request)}, expected {_name(request)}")
    if flags != REPLY_FLAGS:
        raise VhostUserProtocolError(f"{_name(request)} reply flags {flags:#x}, expected 0x5")
    if got_size != len(payload) or (size is not None and got_size != size):
        raise VhostUserProtocolError(f"{_name(request)} reply size {got_size}")
    return payload
