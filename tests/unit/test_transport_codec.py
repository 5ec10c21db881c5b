"""vhost-user codec and connection: golden bytes, framing in any split, malformed input."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from vfsd.transport import FramingError, VhostUserProtocolError
from vfsd.transport.abi import HEADER, MAX_PAYLOAD_SIZE, VhostUserRequest
from vfsd.transport.codec import (
    AddMemReg,
    MessageReader,
    RawPayload,
    RemMemReg,
    SetMemTable,
    U64Payload,
    VhostUserMessage,
    VringAddr,
    VringFile,
    VringState,
    decode,
    decode_reply,
    encode_ack,
    encode_reply,
    encode_request,
    encode_state_reply,
    encode_u64_reply,
)
from vfsd.transport.connection import PeerClosed, recv_frame, recv_message, send_message
from vfsd.transport.memory import MemRegion

R = VhostUserRequest
H = bytes.fromhex

# The two regions QEMU 7.2 sent for a 512 MiB pc guest (PROTOCOLS.md A.6).
LOW = MemRegion(0x0, 0xA0000, 0x7F0000000000, 0x0)
HIGH = MemRegion(0xC0000, 0x1FF40000, 0x7F00000C0000, 0xC0000)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def efds():
    """Factory of eventfds; whatever a test does not hand over is closed afterwards."""
    made: list[int] = []

    def make(n: int = 1) -> list[int]:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]
        made.extend(fds)
        return fds

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


def split(frame: bytes) -> tuple[bytes, bytes]:
    return frame[:12], frame[12:]


# -- golden vectors: (frame bytes, number of fds, expected message) ---------------------------
GOLDEN = [
    ("get_features", H("01000000" "01000000" "00000000"), 0,
     VhostUserMessage(R.GET_FEATURES, 0x1, None)),
    ("set_features", H("02000000" "01000000" "08000000" "0000007001000000"), 0,
     VhostUserMessage(R.SET_FEATURES, 0x1, U64Payload(0x170000000))),
    ("set_protocol_features", H("10000000" "01000000" "08000000" "0980000000000000"), 0,
     VhostUserMessage(R.SET_PROTOCOL_FEATURES, 0x1, U64Payload(0x8009))),
    ("set_vring_num", H("08000000" "01000000" "08000000" "01000000" "80000000"), 0,
     VhostUserMessage(R.SET_VRING_NUM, 0x1, VringState(1, 128))),
    ("get_vring_base", H("0b000000" "01000000" "08000000" "01000000" "00000000"), 0,
     VhostUserMessage(R.GET_VRING_BASE, 0x1, VringState(1, 0))),
    ("set_vring_enable", H("12000000" "01000000" "08000000" "00000000" "01000000"), 0,
     VhostUserMessage(R.SET_VRING_ENABLE, 0x1, VringState(0, 1))),
    ("set_vring_addr",
     H("09000000" "01000000" "28000000" "01000000" "00000000"
       "0000100000000000" "4009100000000000" "0008100000000000" "4009100000000000"), 0,
     VhostUserMessage(R.SET_VRING_ADDR, 0x1,
                      VringAddr(1, 0, 0x100000, 0x100940, 0x100800, 0x100940))),
    ("set_vring_kick", H("0c000000" "01000000" "08000000" "0100000000000000"), 1,
     VhostUserMessage(R.SET_VRING_KICK, 0x1, VringFile(1, False, -1))),
    ("set_vring_call_nofd", H("0d000000" "01000000" "08000000" "0001000000000000"), 0,
     VhostUserMessage(R.SET_VRING_CALL, 0x1, VringFile(0, True, None))),
    ("set_mem_table",
     H("05000000" "09000000" "48000000" "02000000" "00000000"
       "0000000000000000" "00000a0000000000" "00000000007f0000" "0000000000000000"
       "00000c0000000000" "0000f41f00000000" "00000c00007f0000" "00000c0000000000"), 2,
     VhostUserMessage(R.SET_MEM_TABLE, 0x9, SetMemTable((LOW, HIGH), (-1, -1)))),
    ("add_mem_reg",
     H("25000000" "09000000" "28000000" "0000000000000000"
       "00000c0000000000" "0000f41f00000000" "00000c00007f0000" "00000c0000000000"), 1,
     VhostUserMessage(R.ADD_MEM_REG, 0x9, AddMemReg(HIGH, -1))),
    ("rem_mem_reg",
     H("26000000" "09000000" "28000000" "0000000000000000"
       "0000000000000000" "00000a0000000000" "00000000007f0000" "0000000000000000"), 0,
     VhostUserMessage(R.REM_MEM_REG, 0x9, RemMemReg(LOW))),
    ("unknown_request", H("63000000" "01000000" "03000000" "616263"), 0,
     VhostUserMessage(99, 0x1, RawPayload(b"abc"))),
    ("unsupported_known", H("18000000" "01000000" "00000000"), 0,
     VhostUserMessage(R.GET_CONFIG, 0x1, RawPayload(b""))),
]


def _with_fds(expected: VhostUserMessage, fds: list[int]) -> VhostUserMessage:
    """Substitute the real fds for the -1 placeholders of the golden table."""
    p = expected.payload
    if isinstance(p, VringFile) and not p.nofd:
        p = VringFile(p.index, False, fds[0])
    elif isinstance(p, SetMemTable):
        p = SetMemTable(p.regions, tuple(fds))
    elif isinstance(p, AddMemReg):
        p = AddMemReg(p.region, fds[0])
    return VhostUserMessage(expected.request, expected.flags, p, tuple(fds))


@pytest.mark.parametrize(("name", "frame", "nfds", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_decode_and_encode(name, frame, nfds, expected, efds):
    fds = efds(nfds)
    msg = decode(*split(frame), fds)
    assert msg == _with_fds(expected, fds)
    assert isinstance(msg.request, int)
    # Front-end side: the payload classes pack back to the same bytes.
    payload = b"" if msg.payload is None else msg.payload.pack()
    assert encode_request(msg.request, payload, need_reply=msg.need_reply) == frame


def test_golden_replies():
    assert encode_u64_reply(R.GET_FEATURES, 0x170000000) == H(
        "01000000" "05000000" "08000000" "0000007001000000")
    assert encode_state_reply(R.GET_VRING_BASE, 1, 31) == H(
        "0b000000" "05000000" "08000000" "01000000" "1f000000")
    assert encode_ack(R.ADD_MEM_REG, True) == H("25000000" "05000000" "08000000" + "00" * 8)
    assert encode_ack(R.ADD_MEM_REG, False)[12:] != bytes(8)
    assert encode_reply(R.GET_QUEUE_NUM, b"")[4:8] == H("05000000")


def test_decode_reply_checks_like_qemu():
    frame = encode_u64_reply(R.GET_FEATURES, 7)
    assert decode_reply(R.GET_FEATURES, *split(frame), size=8) == struct.pack("<Q", 7)
    with pytest.raises(VhostUserProtocolError, match="expected GET_PROTOCOL"):
        decode_reply(R.GET_PROTOCOL_FEATURES, *split(frame))
    bad_flags = HEADER.pack(R.GET_FEATURES, 0x1, 8) + bytes(8)  # must be exactly 0x5
    with pytest.raises(VhostUserProtocolError, match="flags"):
        decode_reply(R.GET_FEATURES, *split(bad_flags))
    with pytest.raises(VhostUserProtocolError, match="size"):
        decode_reply(R.GET_FEATURES, *split(frame), size=12)


# -- malformed requests ----------------------------------------------------------------------
def frame_of(request: int, payload: bytes, flags: int = 0x1) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


MALFORMED = [
    ("u64_too_short", frame_of(R.SET_FEATURES, bytes(4)), 0, "4 bytes, expected 8"),
    ("payload_on_get", frame_of(R.GET_FEATURES, bytes(8)), 0, "expected 0"),
    ("fd_on_get", frame_of(R.GET_FEATURES, b""), 1, "1 fds, expected 0"),
    ("state_too_long", frame_of(R.SET_VRING_NUM, bytes(12)), 0, "12 bytes"),
    ("addr_too_short", frame_of(R.SET_VRING_ADDR, bytes(32)), 0, "32 bytes"),
    ("kick_fd_and_nofd", frame_of(R.SET_VRING_KICK, struct.pack("<Q", 0x101)), 1, "NOFD=set"),
    ("kick_no_fd", frame_of(R.SET_VRING_KICK, struct.pack("<Q", 0x1)), 0, "NOFD=clear"),
    ("kick_unknown_bits", frame_of(R.SET_VRING_CALL, struct.pack("<Q", 0x201)), 1,
     "unknown bits"),
    ("mem_table_fd_mismatch",
     frame_of(R.SET_MEM_TABLE, SetMemTable((LOW, HIGH), ()).pack()), 1, "1 fds, expected 2"),
    ("mem_table_count_vs_size",
     frame_of(R.SET_MEM_TABLE, struct.pack("<II", 3, 0) + SetMemTable((LOW,), ()).pack()[8:]),
     3, "expected 104"),
    ("mem_table_nine_regions",
     frame_of(R.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(32 * 9)), 0, "9 regions"),
    ("mem_table_zero_size_region",
     frame_of(R.SET_MEM_TABLE, SetMemTable((MemRegion(0, 0, 0, 0),), ()).pack()), 1, "size 0"),
    ("mem_table_gpa_overflow",
     frame_of(R.SET_MEM_TABLE, SetMemTable((MemRegion(2**64 - 4096, 8192, 0, 0),), ()).pack()),
     1, "overflows"),
    ("add_mem_reg_without_fd", frame_of(R.ADD_MEM_REG, AddMemReg(LOW, 0).pack()), 0, "0 fds"),
    ("rem_mem_reg_two_fds", frame_of(R.REM_MEM_REG, RemMemReg(LOW).pack()), 2, "2 fds"),
    ("reply_flag_on_request", frame_of(R.GET_FEATURES, b"", flags=0x5), 0, "REPLY flag"),
    ("too_many_fds", frame_of(R.SET_FEATURES, bytes(8)), 9, "9 fds"),
]


@pytest.mark.parametrize(("name", "frame", "nfds", "match"), MALFORMED,
                         ids=[m[0] for m in MALFORMED])
def test_malformed_payload_rejected_and_fds_closed(name, frame, nfds, match, efds):
    fds = efds(nfds)
    with pytest.raises(VhostUserProtocolError, match=match):
        decode(*split(frame), fds)
    assert not any(is_open(fd) for fd in fds), "decode must close the fds of a bad message"


@pytest.mark.parametrize(("flags", "match"), [(0x0, "version"), (0x2, "version"),
                                              (0x11, "unknown flag")])
def test_bad_header_flags_are_framing_errors(flags, match):
    with pytest.raises(FramingError, match=match):
        decode(*split(frame_of(R.GET_FEATURES, b"", flags=flags)))


def test_header_size_limit_and_mismatch():
    huge = HEADER.pack(R.SET_MEM_TABLE, 0x1, MAX_PAYLOAD_SIZE + 1)
    with pytest.raises(FramingError, match="payload size"):
        decode(huge, b"")
    with pytest.raises(FramingError, match="got 4"):
        decode(HEADER.pack(R.SET_FEATURES, 0x1, 8), bytes(4))


def test_rem_mem_reg_accepts_one_stray_fd(efds):
    [fd] = efds(1)
    msg = decode(*split(frame_of(R.REM_MEM_REG, RemMemReg(LOW).pack())), [fd])
    assert msg.payload == RemMemReg(LOW) and msg.fds == (fd,)  # the back-end closes it


def test_need_reply_flag_and_names():
    msg = decode(*split(encode_request(R.SET_OWNER, need_reply=True)))
    assert msg.flags == 0x9 and msg.need_reply and msg.name == "SET_OWNER"
    assert decode(*split(frame_of(77, b""))).name == "UNKNOWN(77)"


# -- incremental framing ---------------------------------------------------------------------
def stream_with_fds(efds) -> tuple[list[tuple[bytes, list[int]]], list[VhostUserMessage]]:
    """A realistic start sequence: frames, the fds each one carries, the expected messages."""
    (kick,) = efds(1)
    mem_a, mem_b = efds(2)
    (call,) = efds(1)
    (add,) = efds(1)
    frames = [
        (encode_request(R.GET_FEATURES), []),
        (encode_request(R.SET_FEATURES, U64Payload(0x170000000).pack()), []),
        (encode_request(R.SET_MEM_TABLE, SetMemTable((LOW, HIGH), ()).pack(), need_reply=True),
         [mem_a, mem_b]),
        (encode_request(R.SET_VRING_NUM, VringState(0, 128).pack()), []),
        (encode_request(R.SET_VRING_KICK, VringFile(0, False, None).pack()), [kick]),
        (encode_request(R.SET_VRING_CALL, VringFile(1, False, None).pack()), [call]),
        (encode_request(R.ADD_MEM_REG, AddMemReg(HIGH, 0).pack(), need_reply=True), [add]),
        (encode_request(R.SET_VRING_CALL, VringFile(1, True, None).pack()), []),
    ]
    expected = [decode(*split(f), list(fds)) for f, fds in frames]
    return frames, expected


def test_reader_byte_at_a_time_with_fds_on_first_byte(efds):
    frames, expected = stream_with_fds(efds)
    reader = MessageReader()
    got = []
    for frame, fds in frames:
        for i in range(len(frame)):
            reader.feed(frame[i : i + 1], fds if i == 0 else ())
            msg = reader.next_message()
            if msg is not None:
                got.append(msg)
                assert i == len(frame) - 1, "a message must complete on its last byte"
    assert got == expected
    assert reader.pending_bytes == 0 and reader.next_message() is None


@pytest.mark.parametrize("cut", range(1, 40))
def test_reader_split_at_every_offset(cut, efds):
    """Two messages split anywhere; the fd chunk always ends inside the message owning it."""
    (fd,) = efds(1)
    first = encode_request(R.SET_VRING_NUM, VringState(1, 256).pack())  # 20 bytes
    second = encode_request(R.SET_VRING_KICK, VringFile(1, False, None).pack())  # 20 bytes
    stream = first + second
    reader = MessageReader()
    reader.feed(stream[:cut], [fd] if cut > len(first) else ())
    reader.feed(stream[cut:], [] if cut > len(first) else [fd])
    msgs = [reader.next_message(), reader.next_message()]
    assert msgs == [decode(*split(first)), decode(*split(second), [fd])]
    assert reader.next_message() is None


def test_reader_fds_go_to_the_message_holding_the_chunks_last_byte(efds):
    """Linux ends a stream read after the skb carrying fds: tail of msg 1 + msg 2 + its fds."""
    (fd,) = efds(1)
    first = encode_request(R.GET_FEATURES)
    second = encode_request(R.SET_VRING_CALL, VringFile(0, False, None).pack())
    reader = MessageReader()
    reader.feed(first[:5])
    reader.feed(first[5:] + second, [fd])
    assert reader.next_message().fds == ()
    assert reader.next_message().payload == VringFile(0, False, fd)


def test_reader_bad_payload_fails_one_message_only(efds):
    (fd,) = efds(1)
    bad = frame_of(R.SET_FEATURES, bytes(4))
    good = encode_request(R.SET_VRING_CALL, VringFile(0, False, None).pack())
    reader = MessageReader()
    reader.feed(bad + good[:3])
    reader.feed(good[3:], [fd])
    with pytest.raises(VhostUserProtocolError):
        reader.next_message()
    assert reader.next_message().payload == VringFile(0, False, fd)


def test_reader_framing_error_breaks_the_reader_and_closes_fds(efds):
    (fd,) = efds(1)
    reader = MessageReader()
    reader.feed(encode_request(R.GET_FEATURES))
    reader.feed(HEADER.pack(R.SET_FEATURES, 0x1, MAX_PAYLOAD_SIZE + 8), [fd])
    assert reader.next_message().request == R.GET_FEATURES  # earlier messages still delivered
    with pytest.raises(FramingError):
        reader.next_message()
    assert not is_open(fd)
    reader.feed(encode_request(R.GET_FEATURES))
    with pytest.raises(FramingError):
        reader.next_message()


# -- the socket side -------------------------------------------------------------------------
@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_connection_fds_arrive_with_their_message(pair, efds):
    front, back = pair
    fds = efds(2)
    table = SetMemTable((LOW, HIGH), ())
    send_message(front, encode_request(R.GET_FEATURES))
    send_message(front, encode_request(R.SET_MEM_TABLE, table.pack(), need_reply=True), fds)
    send_message(front, encode_request(R.SET_VRING_CALL, VringFile(0, True, None).pack()))
    assert recv_message(back) == VhostUserMessage(R.GET_FEATURES, 0x1, None)
    msg = recv_message(back)
    assert isinstance(msg.payload, SetMemTable) and len(msg.fds) == 2
    assert msg.payload.regions == (LOW, HIGH) and msg.payload.fds == msg.fds
    # Received fds are new descriptors for the same eventfds, close-on-exec.
    assert all(os.get_inheritable(fd) is False for fd in msg.fds)
    assert [os.fstat(fd).st_ino for fd in msg.fds] == [os.fstat(fd).st_ino for fd in fds]
    for fd in msg.fds:
        os.close(fd)
    assert recv_message(back).payload == VringFile(0, True, None)


def test_connection_header_and_payload_written_separately(pair, efds):
    front, back = pair
    (fd,) = efds(1)
    frame = encode_request(R.SET_VRING_KICK, VringFile(1, False, None).pack())
    send_message(front, frame[:5], [fd])
    send_message(front, frame[5:14])
    send_message(front, frame[14:])
    msg = recv_message(back)
    assert msg.payload.index == 1 and len(msg.fds) == 1
    os.close(msg.fds[0])


def test_connection_eof(pair):
    front, back = pair
    send_message(front, encode_request(R.GET_FEATURES))
    front.shutdown(socket.SHUT_WR)
    recv_message(back)
    with pytest.raises(PeerClosed) as info:
        recv_message(back)
    assert not info.value.partial


def test_connection_eof_inside_a_message(pair, efds):
    front, back = pair
    (fd,) = efds(1)
    frame = encode_request(R.SET_FEATURES, U64Payload(1).pack())
    send_message(front, frame[:15], [fd])
    front.shutdown(socket.SHUT_WR)
    with pytest.raises(PeerClosed) as info:
        recv_frame(back)
    assert info.value.partial


def test_connection_too_many_fds_keeps_the_stream_in_sync(pair, efds):
    front, back = pair
    fds = efds(9)
    send_message(front, encode_request(R.SET_MEM_TABLE, SetMemTable((LOW,), ()).pack()), fds)
    send_message(front, encode_request(R.GET_QUEUE_NUM))
    with pytest.raises(VhostUserProtocolError, match="fds"):
        recv_message(back)
    assert recv_message(back).request == R.GET_QUEUE_NUM


def test_connection_oversized_header(pair):
    front, back = pair
    send_message(front, HEADER.pack(R.SET_FEATURES, 0x1, 1 << 20))
    with pytest.raises(FramingError):
        recv_message(back)


def test_connection_round_trip_reply(pair):
    front, back = pair
    send_message(back, encode_u64_reply(R.GET_PROTOCOL_FEATURES, 0x8009))
    header, payload, fds = recv_frame(front)
    assert fds == []
    assert decode_reply(R.GET_PROTOCOL_FEATURES, header, payload, size=8) == H("0980" + "00" * 6)
