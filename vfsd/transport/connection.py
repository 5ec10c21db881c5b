"""The transport layer's only socket I/O: one vhost-user frame in, one frame out.

Blocking reads on a connected AF_UNIX SOCK_STREAM socket. The 12-byte header is read with
`recvmsg(12, CMSG_SPACE(8 fds))`, so the fds QEMU attached to the message arrive on that call
(PROTOCOLS.md A.1); then exactly `size` payload bytes. fds are received close-on-exec. Every fd
received for a frame that fails is closed here; on success they belong to the message.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

from vfsd.transport import TransportError, VhostUserProtocolError
from vfsd.transport.abi import HEADER_SIZE, MAX_FDS
from vfsd.transport.codec import VhostUserMessage, close_fds, decode, parse_header

_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


class PeerClosed(TransportError):
    """The peer closed the connection (at a message boundary, or inside one: `partial`)."""

    def __init__(self, message: str = "peer closed the connection", partial: bool = False):
        super().__init__(message)
        self.partial = partial


class FdsTruncated(VhostUserProtocolError):
    """A message carried more fds than fit (MSG_CTRUNC). The frame was read whole, so the
    stream is still in sync: `header` lets the caller refuse that one message."""

    def __init__(self, header: bytes) -> None:
        super().__init__(f"more than {MAX_FDS} fds on one message")
        self.header = header


def _collect_fds(ancdata: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(arr)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes, list[int]]:
    """Read one frame: (header, payload, fds). Raises PeerClosed on EOF, FramingError on a bad
    header, FdsTruncated if fds were truncated (the frame itself was consumed)."""
    fds: list[int] = []
    header = bytearray()
    truncated = False
    try:
        while len(header) < HEADER_SIZE:
            data, anc, msg_flags, _addr = sock.recvmsg(HEADER_SIZE - len(header), _ANC_SIZE,
                                                       _RECV_FLAGS)
            _collect_fds(anc, fds)
            truncated |= bool(msg_flags & socket.MSG_CTRUNC)
            if not data:
                if header or fds:
                    raise PeerClosed("EOF inside a message header", partial=True)
                raise PeerClosed()
            header += data
        _request, _flags, size = parse_header(header)
        payload = bytearray(size)
        view = memoryview(payload)
        got = 0
        while got < size:
            # recvmsg_into (not recv_into) so that stray fds are collected and closed, never leaked.
            n, anc, msg_flags, _addr = sock.recvmsg_into([view[got:]], _ANC_SIZE, _RECV_FLAGS)
            _collect_fds(anc, fds)
            truncated |= bool(msg_flags & socket.MSG_CTRUNC)
            if n == 0:
                raise PeerClosed("EOF inside a message payload", partial=True)
            got += n
        if truncated:
            raise FdsTruncated(bytes(header))
        return bytes(header), bytes(payload), fds
    except BaseException:
        close_fds(fds)
        raise


def recv_message(sock: socket.socket) -> VhostUserMessage:
    """Read and decode one front-end request (see `recv_frame` and `codec.decode` for errors)."""
    header, payload, fds = recv_frame(sock)
    return decode(header, payload, fds)


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one frame; `fds` ride on the first `sendmsg` (with the header), as QEMU does."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
    else:
        sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
