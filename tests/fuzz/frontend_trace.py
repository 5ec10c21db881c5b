"""Seed material: what the project's front-end (QEMU 7.2's sequences, `VhostUserClient`) sends
to a back-end, recorded frame by frame, with the guest-RAM writes of the requests it queues.

The back-end on the other end of the socketpair is the real `VhostUserBackend` (with the
fuzz targets' `EchoDevice`), so every reply the client waits for is a real one.
"""

from __future__ import annotations

import os
import socket
import threading

from tests.fuzz.fuzz_vhost_backend import RAM_SIZE, EchoDevice
from vfsd.frontend.fuse_client import INIT_FLAGS2_61, INIT_FLAGS_61, build
from vfsd.frontend.vhost_client import GuestRam, VhostUserClient
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.transport.backend import VhostUserBackend
from vfsd.transport.codec import decode
from vfsd.transport.connection import PeerClosed, recv_frame, send_message

# ("frame", bytes, nfds), ("guest", data, file offset) or ("kick", b"", queue)
Event = tuple[str, bytes, int]


def _serve(sock: socket.socket, events: list[Event]) -> None:
    backend = VhostUserBackend(EchoDevice(), num_queues=3)
    try:
        while True:
            try:
                header, payload, fds = recv_frame(sock)
            except (PeerClosed, OSError):
                return
            events.append(("frame", header + payload, len(fds)))
            reply = backend.handle(decode(header, payload, fds))
            if reply is not None:
                send_message(sock, reply)
    finally:
        backend.close()


def _diff(before: bytes, after: bytes) -> list[Event]:
    """The byte runs that changed, as guest writes (runs closer than 16 bytes merged)."""
    out: list[Event] = []
    i, n = 0, len(after)
    while i < n:
        if before[i] == after[i]:
            i += 1
            continue
        j = i
        while j < n and (before[j] != after[j] or before[j:j + 16] != after[j:j + 16]):
            j += 1
        out.append(("guest", after[i:j], i))
        i = j
    return out


def requests() -> list[tuple[int, list[bytes], list[int], bool]]:
    """(queue, readable buffers, writable sizes, indirect) of a short Linux-like session."""
    def hdr(op: int, nodeid: int, body: bytes, unique: int) -> bytes:
        return build(op, nodeid, body, unique=unique)

    init = abi.INIT_IN.pack(7, 38, 131072, INIT_FLAGS_61, INIT_FLAGS2_61)
    return [
        (1, [hdr(Opcode.INIT, 0, init, 2)[:40], init], [16, 64], True),
        (1, [hdr(Opcode.GETATTR, 1, bytes(16), 4)[:40], bytes(16)], [16, 104], True),
        (1, [hdr(Opcode.LOOKUP, 1, b"hello\0", 6)[:40], b"hello\0"], [16, 128], False),
        (0, [build(Opcode.FORGET, 3, abi.FORGET_IN.pack(1), unique=8)], [], False),
        (1, [hdr(Opcode.READ, 3, abi.READ_IN.pack(1, 0, 4096, 0, 0, 0, 0), 10)[:40],
             abi.READ_IN.pack(1, 0, 4096, 0, 0, 0, 0)], [16, 4096], True),
    ]


def record_session() -> list[Event]:
    """realize + start + a few requests + stop + resume, as events in order."""
    events: list[Event] = []
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = threading.Thread(target=_serve, args=(b, events))
    server.start()
    ram = GuestRam(RAM_SIZE)
    client = VhostUserClient(a, ram=ram, num_queues=2, queue_size=16)
    try:
        client.realize()
        client.start()
        for queue, readable, writable, indirect in requests():
            before = os.pread(ram.fd, RAM_SIZE, 0)
            client.submit(queue, readable, writable, indirect, kick=False)
            client.sync()  # the frames so far are recorded before the guest's writes
            events += _diff(before, os.pread(ram.fd, RAM_SIZE, 0))
            events.append(("kick", b"", queue))
        client.stop()
        client.start(reset=False)
    finally:
        client.close()
        server.join()
        b.close()
    return events
