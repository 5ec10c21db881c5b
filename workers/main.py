"""A worker process: pop (queue, head) records, serve each FUSE request, return the chains.

The worker returns its chains to the guest itself (`vfsd/dispatch/used.py`): once per batch
it writes the used elements under the queue's used-ring lock and interrupts the guest when
EVENT_IDX asks for it. It also pushes a completion record per request to its completion
ring, which the supervisor reads when it is awake anyway (load, in-flight bookkeeping,
status); the supervisor is woken only when it waits for them (a barrier).

Pre-fork the supervisor builds a `WorkerSpec` (plain data and shared objects); everything that
touches the process itself (signals, lock files, guest memory) happens in `run` after fork.

A request the server defers (a SETLKW that must wait) is completed later: the loop also
waits on the server's `deferred_fd` and completes what `collect()` returns. Only this thread
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
from vfsd.dispatch.used import UsedLock, UsedRing
from vfsd.fs.inode_table import InodeTable
from vfsd.fuse.abi import Opcode
from vfsd.fuse.init import Session
from vfsd.fuse.options import FsOptions
from vfsd.logs import set_level as set_log_level
from vfsd.metrics.slab import BufferedWorkerMetrics, Slab
from vfsd.transport import GuestMemoryError, GuestProtocolError
from vfsd.transport.memory import GuestMemory, MemRegion
from vfsd.transport.virtqueue import read_chain
from workers.passthrough.fs import PassthroughFs
from workers.server import FuseServer

log = logging.getLogger("vfsd.worker")

IDLE_WAIT = 1.0  # seconds between heartbeats when idle
FLUSH_INTERVAL_NS = 200_000  # a long batch still returns what it finished this often
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
    used_locks: dict[int, UsedLock]  # request queue -> its shared used-ring state
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
        self.layouts: dict[int, dict] = {}  # queue -> its VRING message (remaps)
        self.used: dict[int, UsedRing] = {}  # queue -> this worker's writer of its used ring
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
            for used in self.used.values():
                used.unmap()  # before the old mappings go
            if self.mem is not None:
                self.mem.close()
            self.mem = mem
            for queue in self.used:
                self._map_used(queue)
        elif kind == control.VRING:
            queue = message["queue"]
            self.vrings[queue] = (message["desc_gpa"], message["size"])
            self.layouts[queue] = message
            used = self.used.get(queue)
            if used is None:
                used = self.used[queue] = UsedRing(self.spec.used_locks[queue],
                                                   self.spec.index + 1)
                used.refresh = self.poll_control
            used.set_call_fd(fds[0] if fds else None)
            self._map_used(queue)
        elif kind == control.CALL:
            used = self.used.get(message["queue"])
            if used is not None:
                used.set_call_fd(fds[0] if fds else None)
            else:  # not started here yet: the VRING message will carry the fd
                for fd in fds:
                    os.close(fd)
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

    def _map_used(self, queue: int) -> None:
        used, layout = self.used[queue], self.layouts[queue]
        used.unmap()
        if self.mem is None:
            return
        try:
            used.map(self.mem, layout["size"], layout["avail_gpa"], layout["used_gpa"],
                     layout["event_idx"])
        except GuestMemoryError:
            log.error("queue %d: used ring outside guest memory", queue)

    def sync(self, epoch: int) -> None:
        """Apply control messages until the worker has reached `epoch`."""
        while self.epoch < epoch:
            self.apply(*control.recv(self.control))

    def poll_control(self) -> None:
        """Apply every control message already sent (also: a used ring saw a new call fd
        generation, whose CALL message was sent before the generation moved)."""
        gens = {q: u.lock.call_gen for q, u in self.used.items()}
        while select.select([self.control], [], [], 0)[0]:
            self.apply(*control.recv(self.control))
        for queue, gen in gens.items():
            self.used[queue].call_gen_seen = gen

    # requests
    def serve(self, records: list[int]) -> None:
        server = self.server
        record_metrics = self.metrics.record if self.recording else None
        now = time.monotonic_ns
        t = flushed = now()
        done: list[int] = []  # completion records, returned to the guest in batches
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
                written = server.handle(chain.readable, chain.writable, queue << 16 | head)
            except GuestProtocolError as e:
                log.warning("dropping request queue=%d head=%d: %s", queue, head, e)
            except KeyError:
                log.error("request for unknown queue %d", queue)
            if written is None:
                continue  # deferred: completed (and counted) by complete_deferred()
            done.append(queue | head << 16 | written << 32)  # pack_completion
            t1 = now()
            if record_metrics is not None and chain is not None:
                record_metrics(*_outcome(server.header, chain.writable, written), t1 - t)
            t = t1
            # Return the batch at its end, or sooner if it runs long.
            if t1 - flushed > FLUSH_INTERVAL_NS:
                self.complete(done)
                done = []
                flushed = t1
        if done:
            self.complete(done)

    def complete(self, done: list[int]) -> None:
        """Return chains to the guest (used ring + interrupt), then tell the supervisor."""
        channel = self.channel
        channel.block[CB_SERVED] += len(done)  # before the guest can see them
        queue = done[0] & 0xFFFF
        if all(r & 0xFFFF == queue for r in done):
            self._return(queue, done)
        else:
            for q in {r & 0xFFFF for r in done}:
                self._return(q, [r for r in done if r & 0xFFFF == q])
        channel.completions.push(done)
        channel.completions.wake_if_sleeping(self.spec.completion_doorbell)

    def _return(self, queue: int, done: list[int]) -> None:
        used = self.used.get(queue)
        if used is None:
            log.error("completions for unknown queue %d dropped", queue)
            return
        # A completion record is queue | head << 16 | length << 32; a used element is
        # head | length << 32.
        used.complete([r >> 16 & 0xFFFF | r >> 32 << 32 for r in done],
                      [r >> 16 & 0xFFFF for r in done])

    def complete_deferred(self) -> None:
        done = self.server.collect()
        if done:
            self.complete([pack_completion(token >> 16, token & 0xFFFF, written)
                           for token, written in done])

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
