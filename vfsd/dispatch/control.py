"""The control channel: ordered messages (with fds) from the supervisor to one worker.

A `SOCK_SEQPACKET` socketpair keeps message boundaries, and `SCM_RIGHTS` carries the guest
memory fds. Every message has an `epoch`; requests in the ring carry the epoch the worker
must have reached before serving them, so a memory-table change or a new vring layout is
always applied before the first request that depends on it.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import orjson

MAX_MESSAGE = 1 << 16
MAX_FDS = 64

# Message kinds.
MEMORY = "memory"  # regions: [[gpa, size, va, mmap_offset], ...] + one fd per region
VRING = "vring"  # queue, desc_gpa, avail_gpa, used_gpa, size, event_idx (+ the call fd)
CALL = "call"  # queue (+ the new call fd, or none): the guest's interrupt eventfd changed
SESSION = "session"  # session: the negotiated FUSE session (after INIT)
DESTROY = "destroy"  # drop every handle and cached inode
STOP = "stop"  # finish the ring and exit
INTERRUPT = "interrupt"  # unique: cancel that deferred request (FUSE_INTERRUPT)
CACHE = "cache"  # cache: the cache mode for new entries and opens (SIGHUP reload)
METRICS = "metrics"  # on: whether to record per-request metrics (SIGHUP reload)
LOG_LEVEL = "log_level"  # level: the new log level (SIGHUP reload)
CANCEL_DEFERRED = "cancel_deferred"  # answer every deferred request now (before a barrier)


def control_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = orjson.dumps(message)
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"control message too large: {len(data)} bytes")
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Block for the next message; raises EOFError when the supervisor is gone."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("control channel closed")
    return orjson.loads(data), fds
