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
import struct
import time
from dataclasses import dataclass

from vfsd.dispatch import control
from vfsd.dispatch.channel import (
    CB_EPOCH,
    CB_HEARTBEAT_NS,
    CB_PID,
    CB_SERVED,
    CB_SWEEP,
    WorkerChannel,
)
from vfsd.dispatch.ring import pack_completion, unpack_request
from vfsd.fs.inode_table import InodeTable
from vfsd.fuse.abi import Opcode
from vfsd.fuse.init import Session
from vfsd.fuse.options import FsOptions
from vfsd.logs import set_level as set_log_level
from vfsd.metrics.slab import BufferedWorkerMetrics, Slab
from vfsd.transport import GuestProtocolError
from vfsd.transport.memory import GuestMemory, MemRegion
from vfsd.transport.virtqueue import read_chain
from workers.passthrough.fs import PassthroughFs
from workers.server import FuseServer

log = logging.getLogger("vfsd.worker")

IDLE_WAIT = 1.0  # seconds between heartbeats when idle
WAKE_INTERVAL_NS = 200_000  # a long batch still wakes the supervisor this often
SWEEP_INTERVAL_NS = 1_000_000_000

_U32 = struct.Struct("<I")
_WRITE_HEAD = 80  # fuse_in_header + fuse_write_in
_READ, _WRITE = int(Opcode.READ), int(Opcode.WRITE)


def _u32_at(views: list[memoryview], offset: int) -> int:
    """A u32 at `offset` of a byte stream split over descriptors (0 if it is not there)."""
    for view in views:
        n = len(view)
        if offset + 4 <= n:
            return _U32.unpack_from(view, offset)[0]
        if offset < n:
            return 0  # split across descriptors: not worth gathering for a metric
        offset -= n
    return 0


def _outcome(header: tuple[int, ...], writable: list[memoryview], written: int
             ) -> tuple[int, int, int, int]:
    """(opcode, errno, bytes read, bytes written) of a served request, for the metrics slab:
    the decoded `fuse_in_header` and the reply's `fuse_out_header.error` (in its own
    descriptor in Linux's layout, so one unpack)."""
    opcode = header[1]
    if written < 16:
        return opcode, 0, 0, 0
    w0 = writable[0]
    error = _U32.unpack_from(w0, 4)[0] if len(w0) >= 8 else _u32_at(writable, 4)
    if error:
        return opcode, (1 << 32) - error, 0, 0  # out.error is 0 or a negative errno
    if opcode == _READ:
        return opcode, 0, written - 16, 0
    if opcode == _WRITE:
        return opcode, 0, 0, header[0] - _WRITE_HEAD  # in.len - header - fuse_write_in
    return opcode, 0, 0, 0


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
    metrics_slab: Slab
    record_metrics: bool = True
    cpus: frozenset[int] | None = None  # worker_cpus (the supervisor checked them)


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
        self.metrics = BufferedWorkerMetrics(spec.metrics_slab)
        self.metrics.attach()
        self.recording = spec.record_metrics  # metrics: false costs nothing per request

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
        elif kind == control.CACHE:
            self.server.set_cache(message["cache"])
        elif kind == control.METRICS:
            self.recording = message["on"]
        elif kind == control.LOG_LEVEL:
            set_log_level(message["level"])
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
        record_metrics = self.metrics.record if self.recording else None
        now = time.monotonic_ns
        t = woke = now()
        served = 0
        for record in records:
            queue, head, epoch = unpack_request(record)
            if epoch > self.epoch:
                self.sync(epoch)
            written: int | None = 0
            chain = None
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
                continue  # deferred: completed (and counted) by complete_deferred()
            completions.push_one(pack_completion(queue, head, written))
            served += 1
            t1 = now()
            if record_metrics is not None and chain is not None:
                record_metrics(*_outcome(self.server.header, chain.writable, written), t1 - t)
            t = t1
            # Ring the supervisor once per batch, or sooner if the batch runs long.
            if t1 - woke > WAKE_INTERVAL_NS:
                completions.wake_if_sleeping(doorbell)
                woke = t1
        completions.wake_if_sleeping(doorbell)
        channel.block[CB_SERVED] += served

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
        forgets = channel.forgets
        block = channel.block
        block[CB_PID] = os.getpid()
        server = self.server
        deferred_fd = server.deferred_fd
        waitables = [channel.doorbell, self.control, deferred_fd]
        metrics = self.metrics
        next_sweep = 0
        while self.alive:
            now = block[CB_HEARTBEAT_NS] = time.monotonic_ns()
            metrics.maybe_flush(now)
            if now >= next_sweep:  # inodes a worker freed itself (FORGET on a request queue)
                server.sweep()
                metrics.set_state(*server.fs_state())
                next_sweep = now + SWEEP_INTERVAL_NS
            if len(forgets):  # FORGETs the supervisor served: close those fds first
                server.forgotten(forgets.pop_all())
            if block[CB_SWEEP]:  # the forget ring overflowed
                block[CB_SWEEP] = 0
                server.sweep()
            records = requests.pop_all()
            if records:
                self.serve(records)
                if server.deferred:
                    self.complete_deferred()
                continue
            if requests.prepare_sleep():
                if len(forgets) or block[CB_SWEEP]:  # pushed before the sleep flag was seen
                    requests.cancel_sleep()
                    continue
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
                if not readable and server.deferred:
                    server.tick()
        # STOP: serve whatever was queued before it.
        records = requests.pop_all()
        if records:
            self.serve(records)
        metrics.flush()


def run(spec: WorkerSpec) -> None:
    """Entry point in the forked child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if spec.cpus is not None:
        os.sched_setaffinity(0, spec.cpus)
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
    recovered, lost = fs.recover_handles()
    if recovered or lost:
        log.info("worker %d reopened %d open files of its predecessor (%d lost)", spec.index,
                 recovered, lost)
    Worker(spec, FuseServer(fs)).run()
    os._exit(EXIT_OK)
