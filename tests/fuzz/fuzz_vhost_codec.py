"""vhost-user codec: `MessageReader` framing an arbitrary byte stream cut into chunks, with
fds riding on chunks, and `decode` of every frame it completes.

Input: chunks, each `u8 nfds | u16 length | length bytes`. Documented errors:
`VhostUserProtocolError` (one message), `FramingError` (the reader is broken from then on).
Invariants: a decoded message owns exactly fds that were fed (never one twice), its payload
points only at its own fds, its flags are 0x1 or 0x9, and it re-encodes (payload `pack`) to
a frame that decodes to the same payload; after `close()` no fd fed in is left open.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

from tests.fuzz.harness import Broken, Reader, Writer, close_owned, open_fds
from vfsd.transport import FramingError, VhostUserProtocolError
from vfsd.transport.codec import (
    AddMemReg,
    MessageReader,
    SetMemTable,
    VhostUserMessage,
    VringFile,
    decode,
    encode_request,
)

MAX_LEN = 4096
_MAX_FDS_PER_INPUT = 48


def _without_fds(payload: object) -> object:
    """The payload with fd numbers blanked (a re-decode gets other numbers)."""
    if isinstance(payload, VringFile):
        return dataclasses.replace(payload, fd=None)
    if isinstance(payload, SetMemTable):
        return dataclasses.replace(payload, fds=())
    if isinstance(payload, AddMemReg):
        return dataclasses.replace(payload, fd=-1)
    return payload


def _check(msg: VhostUserMessage, live: set[int]) -> None:
    """`live`: fds fed and not yet handed out in a message."""
    fds = set(msg.fds)
    if len(fds) != len(msg.fds) or not fds <= live:
        raise Broken(f"{msg.name}: fds {msg.fds}, not among the fds fed {sorted(live)}")
    live -= fds
    used: tuple[int | None, ...] = ()
    if isinstance(msg.payload, VringFile):
        used = (msg.payload.fd,) if msg.payload.fd is not None else ()
        if msg.payload.nofd == bool(used):
            raise Broken(f"{msg.name}: NOFD={msg.payload.nofd} with fds {used}")
    elif isinstance(msg.payload, SetMemTable):
        used = msg.payload.fds
    elif isinstance(msg.payload, AddMemReg):
        used = (msg.payload.fd,)
    if not set(used) <= fds:
        raise Broken(f"{msg.name}: payload uses fds {used} outside the message's {msg.fds}")
    if msg.flags not in (0x1, 0x9):
        raise Broken(f"{msg.name}: decoded flags {msg.flags:#x}")
    payload = b"" if msg.payload is None else msg.payload.pack()
    frame = encode_request(msg.request, payload, need_reply=msg.need_reply)
    again = decode(frame[:12], frame[12:], [os.dup(fd) for fd in msg.fds])
    close_owned(again.fds)
    if _without_fds(again.payload) != _without_fds(msg.payload):
        raise Broken(f"{msg.name}: {msg.payload} re-decodes as {again.payload}")


def one_input(data: bytes) -> None:
    before = open_fds()
    reader = MessageReader()
    live: set[int] = set()
    fed = 0
    r = Reader(data)
    broken = False
    try:
        while r.left and not broken:
            nfds = min(r.u8() & 0x0F, _MAX_FDS_PER_INPUT - fed)
            chunk = r.take(min(r.u16(), r.left))
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
            fed += nfds
            live.update(fds)
            reader.feed(chunk, fds)
            while True:
                try:
                    msg = reader.next_message()
                except FramingError:
                    broken = True
                    break
                except VhostUserProtocolError:
                    continue
                if msg is None:
                    break
                try:
                    _check(msg, live)
                finally:
                    close_owned(msg.fds)
    finally:
        reader.close()
    if leaked := open_fds() - before:
        raise Broken(f"fds left open after close(): {sorted(leaked)}")


def encode(frames: list[tuple[bytes, int]], split: int = 0) -> bytes:
    """Seed layout for whole frames (each with its fds), optionally each cut in two."""
    w = Writer()
    for frame, nfds in frames:
        if 0 < split < len(frame):
            w.u8(nfds).u16(split).raw(frame[:split]).u8(0).u16(len(frame) - split)
            w.raw(frame[split:])
        else:
            w.u8(nfds).u16(len(frame)).raw(frame)
    return w.getvalue()


def seeds() -> Iterator[bytes]:
    from tests.fuzz.frontend_trace import record_session

    frames = [(frame, nfds) for kind, frame, nfds in record_session() if kind == "frame"]
    yield encode(frames)
    yield encode(frames, split=5)
    for i in range(0, len(frames), 4):
        yield encode(frames[i:i + 4])
