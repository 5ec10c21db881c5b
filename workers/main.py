"""A worker process: pop (queue, head) records, serve each FUSE request, push completions.

Pre-fork the supervisor builds a `WorkerSpec` (plain data and shared objects); everything that
touches the process itself (signals, lock files, guest memory) happens in `run` after fork.

A request the server defers (a SETLKW that must wait) is completed later: the loop also
waits on the server's `deferred_fd` and pushes what `collect()` returns. Only this thread
pushes to the completion ring (it is single-producer).

Control messages besides the session ones: "interrupt" {unique} cancels that waiting
request (EINTR), "cancel_deferred" cancels all of them (ENOLCK), e.g. before a ring stop.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass

from vfsd.dispatch import control
from vfsd.dispatch.channel import CB_EPOCH, CB_HEARTBEAT_NS, CB_PID, CB_SERVED, WorkerChannel
from vfsd.dispatch.ring import pack_completion, unpack_request
from vfsd.fs.inode_table import InodeTable
from vfsd.fuse.init import Session
from vfsd.fuse.options import FsOptions
from vfsd.transport import GuestProtocolError
from vfsd.transport.memory import GuestMemory, MemRegion
from vfsd.transport.virtqueue import read_chain
from workers.passthrough.fs import PassthroughFs
from workers.server import FuseServer

log = logging.getLogger("vfsd.worker")

IDLE_WAIT = 1.0  # seconds between heartbeats when idle

# Exit codes the supervisor understands (gunicorn's habit: exit codes are a protocol).
EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # the export or the inode table could not be opened


@dataclass
class WorkerSpec:
    index: int
    incarnation: int  # how many times this slot was spawned; keeps fh values unique
    channel: WorkerChannel
    completion_doorbell: int
    table: InodeTable
    options: FsOptions
    close_fds: tuple[int | socket.socket, ...]  # supervisor-only fds inherited through fork


class Worker:
    def __init__(self, spec: WorkerSpec, server: FuseServer) -> None:
        self.spec = spec
        self.channel = spec.channel
        assert self.channel.worker_control is not None
        self.control = self.channel.worker_control
        self.server = server
        self.mem: GuestMemory | None = None
        self.vrings: dict[int, tuple[int, int]] = {}  # queue -> (desc_gpa, queue_size)
        self.epoch = 0
        self.alive = True

    # control channel
    def apply(self, message: dict, fds: list[int]) -> None:
        kind = message["kind"]
        if kind == control.MEMORY:
            regions = [MemRegion(*r) for r in message["regions"]]
            mem = GuestMemory.from_regions(list(zip(regions, fds, strict=True)))
            for fd in fds:  # GuestMemory keeps its own mappings
                os.close(fd)
            if self.mem is not None:
                self.mem.close()
            self.mem = mem
        elif kind == control.VRING:
            self.vrings[message["queue"]] = (message["desc_gpa"], message["size"])
        elif kind == control.SESSION:
            self.server.start_session(Session.from_dict(message["session"]))
        elif kind == control.DESTROY:
            self.server.destroy()
        elif kind == control.STOP:
            self.alive = False
        elif kind == control.INTERRUPT:
            self.server.interrupt(message["unique"])
        elif kind == control.CANCEL_DEFERRED:
            self.server.cancel_deferred()
        else:
            log.error("unknown control message %r", kind)
        self.epoch = message["epoch"]
        self.channel.block[CB_EPOCH] = self.epoch

    def sync(self, epoch: int) -> None:
        """Apply control messages until the worker has reached `epoch`."""
        while self.epoch < epoch:
            self.apply(*control.recv(self.control))

    def poll_control(self) -> None:
        while select.select([self.control], [], [], 0)[0]:
            self.apply(*control.recv(self.control))

    # requests
    def serve(self, records: list[int]) -> None:
        channel = self.channel
        completions = channel.completions
        doorbell = self.spec.completion_doorbell
        for record in records:
            queue, head, epoch = unpack_request(record)
            if epoch > self.epoch:
                self.sync(epoch)
            written: int | None = 0
            try:
                desc_gpa, queue_size = self.vrings[queue]
                assert self.mem is not None
                chain = read_chain(self.mem, desc_gpa, queue_size, head)
                written = self.server.handle(chain.readable, chain.writable, queue << 16 | head)
            except GuestProtocolError as e:
                log.warning("dropping request queue=%d head=%d: %s", queue, head, e)
            except KeyError:
                log.error("request for unknown queue %d", queue)
            if written is None:
                continue  # deferred: completed by complete_deferred()
            completions.push_one(pack_completion(queue, head, written))
            completions.wake_if_sleeping(doorbell)
        channel.block[CB_SERVED] += len(records)

    def complete_deferred(self) -> None:
        done = self.server.collect()
        if not done:
            return
        completions = self.channel.completions
        for token, written in done:
            completions.push_one(pack_completion(token >> 16, token & 0xFFFF, written))
        completions.wake_if_sleeping(self.spec.completion_doorbell)
        self.channel.block[CB_SERVED] += len(done)

    def run(self) -> None:
        channel = self.channel
        requests = channel.requests
        block = channel.block
        block[CB_PID] = os.getpid()
        server = self.server
        deferred_fd = server.deferred_fd
        waitables = [channel.doorbell, self.control, deferred_fd]
        while self.alive:
            block[CB_HEARTBEAT_NS] = time.monotonic_ns()
            records = requests.pop_all()
            if records:
                self.serve(records)
                if server.deferred:
                    self.complete_deferred()
                continue
            if requests.prepare_sleep():
                readable = select.select(waitables, [], [], IDLE_WAIT)[0]
                requests.cancel_sleep()
                if channel.doorbell in readable:
                    try:
                        os.eventfd_read(channel.doorbell)
                    except BlockingIOError:
                        pass
                if self.control in readable:
                    self.poll_control()
                if deferred_fd in readable:
                    self.complete_deferred()
                if not readable:  # idle: let go of fds of inodes the guest forgot
                    server.sweep()
                    if server.deferred:
                        server.tick()
        # STOP: serve whatever was queued before it.
        records = requests.pop_all()
        if records:
            self.serve(records)


def run(spec: WorkerSpec) -> None:
    """Entry point in the forked child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    own_end = spec.channel.control
    for fd in (*spec.close_fds, *((own_end,) if own_end is not None else ())):
        # detach() so a socket object left in the forked copy never closes a reused number
        try:
            os.close(fd.detach() if isinstance(fd, socket.socket) else fd)
        except OSError:
            pass
    spec.channel.control = None
    try:
        spec.table.open_locks()
        fs = PassthroughFs(spec.options, spec.table, spec.index, spec.incarnation)
    except OSError as e:
        log.error("worker %d cannot start: %s", spec.index, e)
        os._exit(EXIT_BOOT_ERROR)
    Worker(spec, FuseServer(fs)).run()
    os._exit(EXIT_OK)
