"""What the supervisor and one worker share: two rings, a doorbell, a control socket.

One `posix_ipc` shared-memory segment per worker holds

    [request ring][completion ring][forget ring][control block]

The forget ring carries the nodeids the supervisor freed while serving FORGET, so the worker
closes their cached fds before its next request; when it is full the supervisor sets
CB_SWEEP instead, and the worker checks its whole cache (nothing is dropped).

The segment name is unlinked as soon as it is mapped: the worker is forked from the
supervisor and inherits the mapping, so nothing is left in /dev/shm if either side dies.
The control block is a row of u64 counters the worker stamps (heartbeat, requests served) and
the supervisor reads without locks.
"""

from __future__ import annotations

import mmap
import os
import socket

import posix_ipc

from vfsd.dispatch import control
from vfsd.dispatch.ring import SpscRing, ring_bytes

RING_CAPACITY = 4096  # >= every head of every queue in flight at once (queues <= 1024 each)
FORGET_CAPACITY = 4096
CONTROL_BLOCK_BYTES = 4096

# Control-block fields (u64 index).
CB_PID = 0
CB_HEARTBEAT_NS = 1  # CLOCK_MONOTONIC of the worker's last loop turn
CB_SERVED = 2  # requests completed since start
CB_EPOCH = 3  # control epoch the worker has applied
CB_SWEEP = 4  # set by the supervisor when the forget ring overflowed


class WorkerChannel:
    """The shared state of one worker slot; survives the worker's restarts."""

    def __init__(self, index: int, capacity: int = RING_CAPACITY) -> None:
        self.index = index
        rb = ring_bytes(capacity)
        fb = ring_bytes(FORGET_CAPACITY)
        size = 2 * rb + fb + CONTROL_BLOCK_BYTES
        name = f"/vfsd-{os.getpid()}-w{index}"
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
        try:
            self._map = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
            shm.unlink()
        view = memoryview(self._map)
        self.requests = SpscRing(view[:rb], capacity)
        self.completions = SpscRing(view[rb : 2 * rb], capacity)
        self.forgets = SpscRing(view[2 * rb : 2 * rb + fb], FORGET_CAPACITY)
        self.block = view[2 * rb + fb : size].cast("Q")
        self.doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoch = 0
        self.control: socket.socket | None = None  # supervisor end
        self.worker_control: socket.socket | None = None  # worker end, closed after fork

    def renew(self) -> None:
        """Fresh rings and a fresh control socketpair for a (re)spawned worker."""
        for ring in (self.requests, self.completions, self.forgets):
            ring.reset()
        for i in range(len(self.block)):
            self.block[i] = 0
        self.close_control()
        self.control, self.worker_control = control.control_pair()
        self.epoch = 0

    def forgotten(self, nodeids: list[int]) -> None:
        """Tell the worker these nodeids were freed (supervisor side); a full ring asks for a
        sweep instead. The caller wakes the worker."""
        ring = self.forgets
        room = ring.free_slots()
        if len(nodeids) <= room:
            ring.push(nodeids)
            return
        if room:
            ring.push(nodeids[:room])
        self.block[CB_SWEEP] = 1

    def send(self, message: dict, fds: list[int] | None = None) -> int:
        """Send a control message; returns the epoch requests must carry from now on."""
        assert self.control is not None
        self.epoch += 1
        message["epoch"] = self.epoch
        control.send(self.control, message, fds)
        return self.epoch

    def close_control(self) -> None:
        for sock in (self.control, self.worker_control):
            if sock is not None:
                sock.close()
        self.control = self.worker_control = None

    def close(self) -> None:
        self.close_control()
        os.close(self.doorbell)
        for ring in (self.requests, self.completions, self.forgets):
            ring._hdr.release()
            ring._slots.release()
        self.block.release()
        try:
            self._map.close()
        except BufferError:  # a view still exported somewhere; the mapping dies with us
            pass
