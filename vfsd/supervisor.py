"""The supervisor: vhost-user device, hiprio queue, request routing and the poll loop.

One loop (epoll) waits on the vhost-user socket, the kick eventfds, the completion doorbell,
the signal pipe and the workers' sentinels. Each turn: handle what woke it, move completions
to the used rings, reap dead workers. Request queues are drained in one go per kick; each
chain is routed by its fuse_in_header (and fh) to a worker ring, once-per-batch doorbells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import logging
import os
import resource
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson

from vfsd import __version__, sdnotify, status
from vfsd.affinity import parse_cpulist, usable
from vfsd.config import BY_KEY, ConfigError, Settings
from vfsd.dispatch import control
from vfsd.dispatch.channel import CB_HEARTBEAT_NS, CB_SERVED
from vfsd.dispatch.fh import fh_lendable, fh_owner
from vfsd.dispatch.ring import RingFull, pack_request, unpack_completion
from vfsd.fs.inode_table import InodeTable
from vfsd.fuse import abi
from vfsd.fuse.init import negotiate
from vfsd.logs import set_level as set_log_level
from vfsd.metrics.collector import DaemonState, WorkerState, make_registry
from vfsd.metrics.http import MetricsServer
from vfsd.metrics.slab import MetricsBook
from vfsd.pool import HaltServer, WorkerPool, WorkerSlot
from vfsd.transport import FramingError, GuestMemoryError, GuestProtocolError
from vfsd.transport.backend import VhostUserBackend
from vfsd.transport.codec import decode
from vfsd.transport.connection import PeerClosed, recv_frame, send_message
from vfsd.transport.memory import GuestMemory
from vfsd.transport.virtqueue import Vring, peek_buffers, peek_chain, read_chain
from workers.passthrough.fs import ExportError, check_export
from workers.passthrough.handles import LENDING

log = logging.getLogger("vfsd.supervisor")

HIPRIO = 0
ROUTE_BYTES = 48  # fuse_in_header + the first u64 of the body (the fh of fh-carrying ops)
_IN_SIZE = abi.IN_HEADER_38.size  # 40: where the body (and an fh-carrying op's fh) starts
_IN_PREFIX = struct.Struct("<IIQQ")  # len, opcode, unique, nodeid: the head of the header
_FH = struct.Struct("<Q")
MAX_BATCH_FORGET = 1 << 16
QUIESCE_TIMEOUT = 30.0
# Edge-triggered eventfds are never read: a u64 counter bumped by 1 per write cannot overflow.
_EDGE = select.EPOLLIN | select.EPOLLET

_HIPRIO_OPS = frozenset({abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT})
_SUPERVISOR_OPS = frozenset(int(op) for op in (*_HIPRIO_OPS, abi.Opcode.INIT,
                                                abi.Opcode.DESTROY))
_READ, _WRITE = int(abi.Opcode.READ), int(abi.Opcode.WRITE)
_FH_OPCODES = frozenset(int(op) for op in abi.FH_OPCODES)  # plain ints: cheaper lookups
_DEAD = 1 << 30  # the load of a worker slot without a process
# Requests that change nothing: a dead worker's ones run again on its successor.
_REPLAYABLE = frozenset(int(op) for op in (
    abi.Opcode.GETATTR, abi.Opcode.READ, abi.Opcode.READDIR, abi.Opcode.STATFS,
    abi.Opcode.ACCESS, abi.Opcode.READLINK, abi.Opcode.GETXATTR, abi.Opcode.LISTXATTR,
    abi.Opcode.LSEEK, abi.Opcode.GETLK))
# READ/WRITE of at least this many bytes may be served by a worker that is not the fh's
# owner (it borrows the fd). Smaller ones stay with the owner: on a 2-core machine lending
# 4 KiB ops costs more than it gains (read4k QD 16, 2 workers: 57-81k ops/s lent vs
# 82-96k not; write4k 39-48k vs 55-76k: borrowing syscalls, and writers of one file queue
# on its inode lock).
_LEND_MIN = 64 * 1024
_READ_HEAD = struct.Struct("<QQI")  # fuse_read_in: fh, offset, size
# A whole FORGET: in_header (len, opcode, unique, nodeid, 16 bytes unused) + nlookup.
_FORGET_REQ = struct.Struct("<IIQQ16xQ")
_FORGET = int(abi.Opcode.FORGET)


class StartupError(Exception):
    """A start-up problem reported as one line with a non-zero exit code."""


def write_reply(writable: list[memoryview], data: bytes) -> int:
    """Copy `data` into the chain's writable part; returns bytes written."""
    pos = 0
    for view in writable:
        if pos >= len(data):
            break
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
    return pos


def listen_status(path: str) -> socket.socket:
    """The `vfsd status` socket; a stale file from a dead vfsd is replaced."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot create status socket {path}: {e.strerror}") from e
    os.chmod(path, 0o600)
    sock.listen(8)
    sock.setblocking(False)
    return sock


def group_id(group: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"--socket-group {group}: no such group") from None


def set_nofile_limit(limit: int) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (ValueError, OSError) as e:
        raise StartupError(f"--rlimit-nofile {limit}: {e}") from e


def listen(settings: Settings) -> socket.socket:
    if settings.socket_fd is not None:
        sock = socket.socket(fileno=settings.socket_fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise StartupError(f"--fd {settings.socket_fd} is not a Unix stream socket")
        return sock
    path = settings.socket_path
    if not path:
        raise StartupError("no vhost-user socket: give --socket-path PATH or --fd FD")
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket file from a previous run
        else:
            raise StartupError(f"socket path {path} is in use by another process")
        finally:
            probe.close()
    # Bind under a temporary name and rename once listening: whoever waits for the socket
    # file to appear (QEMU's launcher, a test) must never find it refusing connections.
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        if settings.socket_group:
            os.chown(tmp, -1, group_id(settings.socket_group))
            os.chmod(tmp, 0o660)
        sock.listen(1)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise StartupError(f"cannot listen on {path}: {e.strerror}") from e
    return sock


class Supervisor:
    def __init__(self, settings: Settings,
                 reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._reload = reload  # re-reads the YAML file and re-applies the CLI flags
        self.options = settings.fs_options()
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.epoll = select.epoll()
        self.rr = 0  # round-robin start for ties between equally loaded workers
        self._replayed: set[int] = set()  # uniques replayed after a worker death
        self.completion_doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.table: InodeTable | None = None
        self.pool: WorkerPool | None = None
        self.backend: VhostUserBackend | None = None
        self.mem: GuestMemory | None = None
        self.kick_fds: dict[int, Vring] = {}  # kick fd -> ring
        self.sentinels: dict[int, WorkerSlot] = {}
        self.session: dict | None = None
        self.book: MetricsBook | None = None
        self.metrics_server: MetricsServer | None = None
        self.status_listener: socket.socket | None = None
        self.status_path = ""
        self.started = time.monotonic()
        self.running = True
        self.exit_code = 0
        self._signal_r, self._signal_w = socket.socketpair()

    # setup
    def start(self) -> None:
        shared = self.settings.shared_dir
        if not shared or not os.path.isdir(shared):
            raise StartupError(f"shared directory {shared!r} does not exist or is not a directory")
        try:
            check_export(shared, self.settings.inode_file_handles)
        except ExportError as e:
            raise StartupError(str(e)) from e
        if self.settings.rlimit_nofile:
            set_nofile_limit(self.settings.rlimit_nofile)  # workers inherit it
        worker_cpus = self._cpus("worker_cpus")
        supervisor_cpus = self._cpus("supervisor_cpus")
        if supervisor_cpus is not None and worker_cpus is None:
            worker_cpus = frozenset(os.sched_getaffinity(0))  # not the supervisor's set
        self.listener = listen(self.settings)
        self.status_path = status.status_path(self.settings.socket_path, os.getpid())
        self.status_listener = listen_status(self.status_path)
        self.table = InodeTable.create(self.settings.inode_capacity)
        workers = self.settings.worker_count
        self.book = MetricsBook(workers)
        self.pool = WorkerPool(workers, self.table, self.options, self.completion_doorbell,
                               self.book)
        self.pool.close_in_child = self._supervisor_fds
        self.pool.worker_cpus = worker_cpus
        if supervisor_cpus is not None:
            os.sched_setaffinity(0, supervisor_cpus)
        self.pool.record_metrics = self.settings.metrics
        self.pool.spawn_all()
        for slot in self.pool.slots:
            self._watch(slot)
        self._signal_w.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the number
        self.epoll.register(self._signal_r.fileno(), select.EPOLLIN)
        self.epoll.register(self.completion_doorbell, _EDGE)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(self.status_listener.fileno(), select.EPOLLIN)
        if self.settings.metrics:
            # After the first forks: workers start without the HTTP thread's state.
            server = MetricsServer(make_registry(self.book, self), self.settings.metrics_listen)
            try:
                server.start()
            except OSError as e:
                raise StartupError(f"cannot serve metrics on {self.settings.metrics_listen}: "
                                   f"{e.strerror}") from e
            self.metrics_server = server
        socket_name = self.settings.socket_path or f"fd:{self.settings.socket_fd}"
        log.info("vfsd ready", extra={"fields": {
            "export": shared, "socket": socket_name, "workers": len(self.pool.slots),
            "cache": self.settings.cache,
            "metrics": self.metrics_server.url if self.metrics_server else "off",
            **{key: getattr(self.settings, key) for key in ("supervisor_cpus", "worker_cpus")
               if getattr(self.settings, key) is not None}}})
        sdnotify.ready(f"serving {shared} to {socket_name}")

    def _cpus(self, key: str) -> frozenset[int] | None:
        text = getattr(self.settings, key)
        if text is None:
            return None
        try:
            return usable(parse_cpulist(text))
        except ValueError as e:
            raise StartupError(f"{key} {text}: {e}") from e

    def _supervisor_fds(self) -> tuple[int | socket.socket, ...]:
        """What a freshly forked worker must close: everything only the supervisor uses."""
        fds: list[int | socket.socket] = [self.epoll.fileno(), self._signal_r, self._signal_w,
                                          *self.kick_fds]
        fds += [s for s in (self.listener, self.conn, self.status_listener) if s is not None]
        if self.metrics_server is not None and (fd := self.metrics_server.fileno()) is not None:
            fds.append(fd)
        assert self.pool is not None
        fds += [s.channel.control for s in self.pool.slots
                if s.channel.control is not None and s.channel.worker_control is None]
        return tuple(fds)

    def _watch(self, slot: WorkerSlot) -> None:
        sentinel = slot.sentinel
        assert sentinel is not None
        self.sentinels[sentinel] = slot
        self.epoll.register(sentinel, select.EPOLLIN)

    # the loop
    def run(self) -> int:
        try:
            self.start()
            while self.running:
                self.turn()
        except HaltServer as e:
            log.error("halting: %s", e)
            self.exit_code = 2
        finally:
            self.shutdown()
        return self.exit_code

    def turn(self) -> None:
        assert self.pool is not None
        timeout = 1.0 if self._prepare_sleep() else 0.0
        events = self.epoll.poll(timeout)
        self._cancel_sleep()
        for fd, _mask in events:
            # Kicks and the completion doorbell are edge-triggered (_EDGE): every write wakes
            # epoll, so their counters need no read — two syscalls less per turn.
            if fd == self.completion_doorbell:
                pass
            elif fd in self.kick_fds:
                self.process_queue(self.kick_fds[fd])
            elif self.conn is not None and fd == self.conn.fileno():
                self.handle_vhost_message()
            elif self.listener is not None and fd == self.listener.fileno():
                self.accept()
            elif fd == self._signal_r.fileno():
                self.handle_signals()
            elif self.status_listener is not None and fd == self.status_listener.fileno():
                self.serve_status()
            elif fd in self.sentinels:
                self.handle_worker_exit(self.sentinels[fd])
            if not self.running:
                return
        self.drain_completions()

    def _prepare_sleep(self) -> bool:
        assert self.pool is not None
        ready = True
        for slot in self.pool.slots:
            if not slot.channel.completions.prepare_sleep():
                ready = False
        return ready

    def _cancel_sleep(self) -> None:
        assert self.pool is not None
        for slot in self.pool.slots:
            slot.channel.completions.cancel_sleep()

    # vhost-user connection
    def accept(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        self.epoll.unregister(self.listener.fileno())
        self.listener.close()
        self.listener = None
        if self.settings.socket_path:
            try:
                os.unlink(self.settings.socket_path)
            except FileNotFoundError:
                pass
        self.conn = conn
        self.backend = VhostUserBackend(self, num_queues=1 + self.settings.num_queues)
        self.epoll.register(conn.fileno(), select.EPOLLIN)
        log.info("front-end connected")

    def handle_vhost_message(self) -> None:
        assert self.conn is not None and self.backend is not None
        try:
            header, payload, fds = recv_frame(self.conn)
            message = decode(header, payload, fds)
        except PeerClosed:
            log.info("front-end disconnected; exiting")
            self.running = False
            return
        except FramingError as e:  # the stream is out of sync: nothing more can be read
            log.error("vhost-user stream broken, dropping the connection: %s", e)
            self.running = False
            self.exit_code = 1
            return
        except GuestProtocolError as e:  # payload undecodable; the stream is still in sync
            reply = self.backend.reject(header, str(e))
        else:
            reply = self.backend.handle(message)
        if reply is not None:
            send_message(self.conn, reply)

    # VirtioFsDevice protocol (called by the backend)
    def memory_changed(self, mem: GuestMemory) -> None:
        self.mem = mem
        for slot in self.pool.live() if self.pool else ():
            self._send_memory(slot)

    def _send_memory(self, slot: WorkerSlot) -> None:
        assert self.mem is not None
        regions = self.mem.regions()
        slot.channel.send({"kind": control.MEMORY,
                           "regions": [[r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                        r.mmap_offset] for r, _fd in regions]},
                          [fd for _r, fd in regions])

    def _send_vring(self, slot: WorkerSlot, vring: Vring) -> None:
        slot.channel.send({"kind": control.VRING, "queue": vring.index,
                           "desc_gpa": vring.desc_gpa, "size": vring.size})

    def queue_started(self, vring: Vring) -> None:
        if vring.kick_fd is not None and vring.kick_fd not in self.kick_fds:
            self.kick_fds[vring.kick_fd] = vring
            self.epoll.register(vring.kick_fd, _EDGE)
        if vring.index != HIPRIO and self.pool is not None:
            for slot in self.pool.live():
                self._send_vring(slot, vring)

    def queue_enabled(self, vring: Vring, enabled: bool) -> None:
        if enabled and vring.started:
            self.process_queue(vring)

    def queue_stopping(self, vring: Vring) -> None:
        """GET_VRING_BASE: complete every in-flight request of this ring before the reply."""
        self.quiesce(lambda key: key >> 16 == vring.index)
        for fd, ring in list(self.kick_fds.items()):
            if ring is vring:
                self.epoll.unregister(fd)
                del self.kick_fds[fd]

    def kick_fd_changed(self, vring: Vring, old_fd: int | None) -> None:
        if old_fd is not None and old_fd in self.kick_fds:
            self.epoll.unregister(old_fd)
            del self.kick_fds[old_fd]

    def call_fd_changed(self, vring: Vring) -> None:
        """The ring object keeps the newest call fd; nothing else holds it."""

    # request routing
    def process_queue(self, vring: Vring) -> None:
        if not vring.ready or self.mem is None:
            return
        try:
            heads = vring.pop_avail()
        except GuestProtocolError as e:
            log.error("queue %d broken: %s", vring.index, e)
            return
        if vring.index == HIPRIO:
            self.serve_hiprio(vring, heads)
        else:
            self.route(vring, heads)

    def route(self, vring: Vring, heads: list[int]) -> None:
        """Send each request to a worker: fh-carrying ops to the fh's owner (or, for READ and
        large WRITE, to a less busy worker that borrows the fd), the rest to the least-loaded
        worker. Runs once per request: header fields are unpacked straight from guest
        memory in Linux's layouts (`peek_buffers`), with `peek_chain` for any other."""
        assert self.pool is not None and self.mem is not None
        mem = self.mem
        desc_table = vring.desc_table
        slots = self.pool.slots
        batches: dict[int, list[int]] = {}
        loads = [len(s.inflight) if s.process is not None else _DEAD for s in slots]
        idle = [load == 0 for load in loads]
        nslots = len(slots)
        queue = vring.index
        now = time.monotonic_ns()
        for head in heads:
            fh = -1
            io = 0  # READ/WRITE payload bytes, when known
            found = peek_buffers(mem, desc_table, head) if desc_table is not None else None
            if found is not None and found[1] >= _IN_SIZE:
                a0, l0, a1, l1 = found
                try:
                    in_len, opcode, unique, nodeid = mem.unpack(_IN_PREFIX, a0)
                    if opcode in _FH_OPCODES:
                        # The body (fh first; a READ's size at 16) follows the header in
                        # the same buffer, or starts the next one.
                        body, room = ((a0 + _IN_SIZE, l0 - _IN_SIZE) if l0 > _IN_SIZE
                                      else (a1, l1))
                        if room >= _READ_HEAD.size and opcode == _READ:
                            fh, _offset, io = mem.unpack(_READ_HEAD, body)
                        elif room >= _FH.size:
                            fh = mem.unpack(_FH, body)[0]
                        else:
                            found = None  # the fh is split: gather the prefix below
                except GuestMemoryError:
                    found = None  # a buffer outside guest memory: the checked walk says so
            else:
                found = None
            if found is None:
                try:
                    prefix = peek_chain(mem, vring.desc_gpa, vring.size, head, ROUTE_BYTES)
                except GuestProtocolError as e:
                    log.warning("dropping chain queue=%d head=%d: %s", queue, head, e)
                    self.complete_now(vring, head, 0)
                    continue
                if len(prefix) < _IN_SIZE:
                    log.warning("dropping chain queue=%d head=%d: %d-byte request", queue,
                                head, len(prefix))
                    self.complete_now(vring, head, 0)
                    continue
                in_len, opcode, unique, nodeid = _IN_PREFIX.unpack_from(prefix)
                if len(prefix) >= ROUTE_BYTES:
                    fh = _FH.unpack_from(prefix, _IN_SIZE)[0]
            if opcode in _SUPERVISOR_OPS:
                self._flush(batches, queue)
                batches = {}
                self.serve_here(vring, head, opcode)
                continue
            if opcode in _FH_OPCODES and fh >= 0:
                owner = fh_owner(fh)
                if not (0 <= owner < nslots) or slots[owner].process is None:
                    self.reply_error(vring, head, unique, errno.EBADF)
                    continue
                if opcode == _WRITE:
                    io = in_len - _IN_SIZE
                if io >= _LEND_MIN and nslots > 1 and fh_lendable(fh):
                    # A busy owner's large READ/WRITE goes to the least-loaded worker, which
                    # borrows the fd (workers/passthrough/handles.py): one open file can
                    # then keep several workers copying.
                    best = min(loads)
                    if best < loads[owner]:
                        owner = loads.index(best)
            else:
                best = min(loads)  # the least-loaded live worker, ties taken in turn
                if best >= _DEAD:
                    self.reply_error(vring, head, unique, errno.EIO)
                    continue
                if nslots == 1:
                    owner = 0
                else:
                    self.rr = rr = (self.rr + 1) % nslots
                    owner = loads.index(best, rr) if best in loads[rr:] else loads.index(best)
            loads[owner] += 1
            slot = slots[owner]
            slot.inflight[queue << 16 | head] = (opcode, nodeid, unique, now)
            # pack_request(queue, head, epoch), inlined: this loop runs once per request
            record = queue | head << 16 | (slot.channel.epoch & 0xFFFFFFFF) << 32
            if idle[owner]:
                # An idle worker gets its first request at once: its wake-up then overlaps
                # the routing of the rest (no extra wake: it is awake for the others).
                idle[owner] = False
                self._flush({owner: [record]}, queue)
                continue
            batch = batches.get(owner)
            if batch is None:
                batches[owner] = [record]
            else:
                batch.append(record)
        self._flush(batches, queue)

    def _flush(self, batches: dict[int, list[int]], queue: int) -> None:
        assert self.pool is not None
        for owner, records in batches.items():
            channel = self.pool.slots[owner].channel
            try:
                channel.requests.push(records)
            except RingFull:  # cannot happen while ring capacity >= all queue sizes
                log.error("worker %d ring full; failing %d requests", owner, len(records))
                raise
            channel.requests.wake_if_sleeping(channel.doorbell)

    # requests the supervisor serves itself
    def serve_here(self, vring: Vring, head: int, opcode: int) -> None:
        if opcode in _HIPRIO_OPS:  # rarely on a request queue (READDIRPLUS error paths)
            self.serve_hiprio(vring, [head])
        elif opcode == abi.Opcode.INIT:
            self.serve_init(vring, head)
        elif opcode == abi.Opcode.DESTROY:
            self.serve_destroy(vring, head)

    def serve_hiprio(self, vring: Vring, heads: list[int]) -> None:
        """FORGET / BATCH_FORGET: no reply; drop lookup counts in the shared table."""
        assert self.mem is not None and self.table is not None
        mem = self.mem
        desc_table = vring.desc_table
        used = []
        for head in heads:
            try:
                found = peek_buffers(mem, desc_table, head) if desc_table is not None else None
                if found is not None and found[1] >= _FORGET_REQ.size:  # a FORGET, in place
                    _len, opcode, _unique, nodeid, nlookup = mem.unpack(_FORGET_REQ, found[0])
                    if opcode == _FORGET:
                        self.table.forget(nodeid, nlookup)
                        used.append((head, 0))
                        continue
                data = peek_chain(mem, vring.desc_gpa, vring.size, head, 48)
                _len, opcode, _unique, nodeid = _IN_PREFIX.unpack_from(data)
                if opcode == abi.Opcode.FORGET:
                    self.table.forget(nodeid, abi.FORGET_IN.unpack_from(data, 40)[0])
                elif opcode == abi.Opcode.BATCH_FORGET:
                    count = min(abi.BATCH_FORGET_IN.unpack_from(data, 40)[0], MAX_BATCH_FORGET)
                    data = peek_chain(self.mem, vring.desc_gpa, vring.size, head,
                                      48 + 16 * count)
                    count = (len(data) - 48) // 16
                    for i in range(count):
                        self.table.forget(*abi.FORGET_ONE.unpack_from(data, 48 + 16 * i))
                elif opcode == abi.Opcode.INTERRUPT:
                    self.forward_interrupt(abi.INTERRUPT_IN.unpack_from(data, 40)[0])
                else:
                    log.warning("unexpected opcode %d on hiprio queue", opcode)
            except (GuestProtocolError, struct.error) as e:
                log.warning("dropping hiprio chain head=%d: %s", head, e)
            used.append((head, 0))
        vring.push_used_batch(used)
        if vring.needs_notification():
            vring.notify()

    def forward_interrupt(self, unique: int) -> None:
        """Tell the worker running request `unique` to cancel it (a waiting SETLKW answers
        EINTR); an already finished request needs nothing (INTERRUPT has no reply)."""
        assert self.pool is not None
        for slot in self.pool.live():
            if any(entry[2] == unique for entry in slot.inflight.values()):
                slot.channel.send({"kind": control.INTERRUPT, "unique": unique})
                return

    def serve_init(self, vring: Vring, head: int) -> None:
        assert self.mem is not None and self.pool is not None
        self.quiesce(lambda key: True)
        chain = read_chain(self.mem, vring.desc_gpa, vring.size, head)
        request = b"".join(bytes(v) for v in chain.readable)[: 40 + abi.INIT_IN.size]
        _len, _op, unique, _nodeid = _IN_PREFIX.unpack_from(request)
        if self.session is not None:  # a new INIT ends the previous session
            self._destroy_session()
        try:
            body, session = negotiate(request[40:], self.options)
        except OSError as e:
            self.reply_error(vring, head, unique, e.errno or errno.EPROTO)
            return
        self.session = session.to_dict()
        for slot in self.pool.live():
            slot.channel.send({"kind": control.SESSION, "session": self.session})
        reply = abi.OUT_HEADER.pack(16 + len(body), 0, unique) + body
        self.complete_now(vring, head, write_reply(chain.writable, reply))
        log.info("FUSE session started", extra={"fields": {
            "minor": session.minor, "max_write": session.max_write}})

    def serve_destroy(self, vring: Vring, head: int) -> None:
        self.quiesce(lambda key: True)
        self._destroy_session()
        assert self.mem is not None
        prefix = peek_chain(self.mem, vring.desc_gpa, vring.size, head, _IN_SIZE)
        unique = _IN_PREFIX.unpack_from(prefix)[2]
        self.reply_error(vring, head, unique, 0)
        log.info("FUSE session destroyed")

    def _destroy_session(self) -> None:
        assert self.pool is not None and self.table is not None
        for slot in self.pool.live():
            slot.channel.send({"kind": control.DESTROY})
        self.table.clear()
        self.session = None

    def reply_error(self, vring: Vring, head: int, unique: int, err: int) -> None:
        """Answer a request from the supervisor (header-only reply, -err)."""
        assert self.mem is not None
        written = 0
        try:
            chain = read_chain(self.mem, vring.desc_gpa, vring.size, head)
            written = write_reply(chain.writable, abi.OUT_HEADER.pack(16, -err, unique))
        except GuestProtocolError as e:
            log.warning("cannot answer head=%d: %s", head, e)
        self.complete_now(vring, head, written)

    def complete_now(self, vring: Vring, head: int, length: int) -> None:
        if not vring.mapped:
            log.warning("dropping completion head=%d for unmapped queue %d", head, vring.index)
            return
        vring.push_used(head, length)
        if vring.needs_notification():
            vring.notify()

    # completions
    def drain_completions(self) -> None:
        """Move every worker's completions to the used rings; one `used.idx` store and at
        most one interrupt per queue per call."""
        assert self.pool is not None
        # A completion record is queue | head << 16 | length << 32 (pack_completion), and
        # (head | length << 32) is the used element: decoded by comprehensions, per batch.
        per_queue: dict[int, list[int]] = {}
        for slot in self.pool.slots:
            records = slot.channel.completions.pop_all()
            if not records:
                continue
            pop = slot.inflight.pop
            answered = [pop((r & 0xFFFF) << 16 | r >> 16 & 0xFFFF, None) for r in records]
            if None in answered:
                # Already answered (EIO after a stuck quiesce): never use a head twice.
                for r, entry in zip(records, answered, strict=True):
                    if entry is None:
                        queue, head, _length = unpack_completion(r)
                        log.warning("dropping late completion queue=%d head=%d", queue, head)
                records = [r for r, entry in zip(records, answered, strict=True)
                           if entry is not None]
            queues = {r & 0xFFFF for r in records}
            for queue in queues:
                mine = records if len(queues) == 1 else [r for r in records
                                                         if r & 0xFFFF == queue]
                per_queue.setdefault(queue, []).extend(
                    [r >> 16 & 0xFFFF | r >> 32 << 32 for r in mine])
        if not per_queue or self.backend is None:
            return
        for queue, elems in per_queue.items():
            vring = self.backend.vrings[queue]
            if not vring.mapped:
                log.warning("dropping %d completions for stopped queue %d", len(elems), queue)
                continue
            vring.push_used_elems(elems)
            if vring.needs_notification():
                vring.notify()

    def quiesce(self, selects) -> None:
        """Wait until no in-flight request matches `selects(queue << 16 | head)`."""
        assert self.pool is not None
        for slot in self.pool.live():  # a waiting SETLKW must not hold the barrier
            if any(selects(k) for k in slot.inflight):
                slot.channel.send({"kind": control.CANCEL_DEFERRED})
        deadline = time.monotonic() + QUIESCE_TIMEOUT
        while True:
            self.drain_completions()
            pending = [s for s in self.pool.slots if any(selects(k) for k in s.inflight)]
            if not pending:
                return
            for slot in pending:
                if slot.process is not None and not slot.process.is_alive():
                    self.handle_worker_exit(slot)
            if time.monotonic() > deadline:
                log.error("requests still in flight after %.0f s; answering them EIO",
                          QUIESCE_TIMEOUT)
                for slot in pending:
                    self._fail_inflight(slot)
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.completion_doorbell)  # level-reset for select()
            select.select([self.completion_doorbell], [], [], 0.01)

    # workers
    def handle_worker_exit(self, slot: WorkerSlot) -> None:
        assert self.pool is not None
        sentinel = slot.sentinel
        if sentinel is not None and sentinel in self.sentinels:
            self.epoll.unregister(sentinel)
            del self.sentinels[sentinel]
        # Before the reap frees its pid: nobody may borrow the dead worker's fds by number.
        LENDING.orphan(slot.index)
        if self.pool.reap(slot) is None:
            log.error("worker %d closed its sentinel but did not exit; killing it", slot.index)
            self.pool.kill(slot)
            self.pool.reap(slot)
        self.drain_completions()  # what it finished before dying
        replay = self._take_replayable(slot)
        self._fail_inflight(slot)
        if self.running:
            self.pool.spawn(slot)
            self._watch(slot)
            self._resync(slot)
            self._replay(slot, replay)
        else:
            slot.inflight.update(replay)
            self._fail_inflight(slot)

    def _take_replayable(self, slot: WorkerSlot) -> dict[int, tuple[int, int, int, int]]:
        """The dead worker's in-flight requests that may simply run again: those that
        change nothing (GETATTR, READ, READDIR, ...), each at most once, so a request that
        kills its worker cannot kill the next one too."""
        replay = {}
        if len(self._replayed) > 4096:
            self._replayed.clear()  # uniques only grow; this only forgets old ones
        for key, entry in list(slot.inflight.items()):
            opcode, _nodeid, unique, _t = entry
            if opcode in _REPLAYABLE and unique not in self._replayed:
                self._replayed.add(unique)
                replay[key] = entry
                del slot.inflight[key]
        return replay

    def _replay(self, slot: WorkerSlot, replay: dict[int, tuple[int, int, int, int]]) -> None:
        """Send requests back to the slot's new worker: it holds the dead one's reopened
        handles (fh ops) and may borrow other owners' fds (lent READs)."""
        if not replay:
            return
        epoch = slot.channel.epoch  # after _resync: the worker applies that first
        slot.inflight.update(replay)
        self._flush({slot.index: [pack_request(key >> 16, key & 0xFFFF, epoch)
                                  for key in replay]}, 0)
        log.warning("replayed %d requests of dead worker %d", len(replay), slot.index)

    def _fail_inflight(self, slot: WorkerSlot) -> None:
        """Requests a dead or stuck worker never answered get EIO (replay comes later)."""
        if self.backend is None:
            slot.inflight.clear()
            return
        for key, (_opcode, _nodeid, unique, _t) in list(slot.inflight.items()):
            vring = self.backend.vrings[key >> 16]
            if vring.mapped:
                self.reply_error(vring, key & 0xFFFF, unique, errno.EIO)
        slot.inflight.clear()

    def _resync(self, slot: WorkerSlot) -> None:
        """Give a respawned worker the memory table, ring layouts and FUSE session."""
        if self.mem is not None:
            self._send_memory(slot)
        if self.backend is not None:
            for vring in self.backend.vrings[1:]:
                if vring.started:
                    self._send_vring(slot, vring)
        if self.session is not None:
            slot.channel.send({"kind": control.SESSION, "session": self.session})

    # metrics (called from the HTTP thread: read only)
    def metrics_state(self) -> DaemonState:
        assert self.pool is not None and self.table is not None
        now = time.monotonic_ns()
        workers = []
        inflight = 0
        for slot in self.pool.slots:
            process = slot.process
            beat = slot.channel.block[CB_HEARTBEAT_NS]
            inflight += len(slot.inflight)
            workers.append(WorkerState(
                slot.index, process.pid if process is not None else None,
                len(slot.channel.requests), (now - beat) / 1e9 if beat else None))
        mem = self.mem
        memory = sum(r.memory_size for r, _fd in mem.regions()) if mem is not None else 0
        return DaemonState(workers, inflight, self.table.count(), memory)

    # vfsd status
    def snapshot(self) -> dict:
        assert self.pool is not None and self.table is not None
        now = time.monotonic_ns()
        workers, inflight = [], []
        for slot in self.pool.slots:
            beat = slot.channel.block[CB_HEARTBEAT_NS]
            workers.append({
                "index": slot.index, "pid": slot.pid, "inflight": len(slot.inflight),
                "served": slot.channel.block[CB_SERVED], "restarts": slot.incarnation - 1,
                "heartbeat_age_s": round((now - beat) / 1e9, 3) if beat else None})
            inflight += status.inflight_rows(slot.inflight, slot.index, now)
        inflight.sort(key=lambda r: -r["age_s"])
        return {
            "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "export": self.settings.shared_dir, "connected": self.conn is not None,
            "fuse_minor": self.session["minor"] if self.session else None,
            "inodes": self.table.count(), "workers": workers,
            "inflight_total": len(inflight), "inflight": inflight[: status.MAX_INFLIGHT_LISTED],
        }

    def serve_status(self) -> None:
        assert self.status_listener is not None
        try:
            conn, _ = self.status_listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                conn.sendall(orjson.dumps(self.snapshot()))
            except OSError as e:
                log.debug("status client went away: %s", e)

    # signals and shutdown
    def handle_signals(self) -> None:
        try:
            data = self._signal_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s; stopping", signal.Signals(signum).name)
                self.running = False
            elif signum == signal.SIGHUP:
                self.reload_config()

    def reload_config(self) -> None:
        """SIGHUP: apply what can change live, log what needs a restart; the guest never
        notices (no ring, session or handle is touched)."""
        if self._reload is None:
            return
        sdnotify.reloading()
        try:
            new = self._reload()
        except ConfigError as e:
            log.error("reload failed, the running configuration stays: %s", e)
            sdnotify.ready()
            return
        old = self.settings
        changed = [k for k in BY_KEY if getattr(old, k) != getattr(new, k)]
        applied: dict[str, Any] = {}
        for key in changed:
            value = getattr(new, key)
            if key == "log_level":  # set after the summary below, so it is always logged
                for slot in self.pool.live() if self.pool else ():
                    slot.channel.send({"kind": control.LOG_LEVEL, "level": value})
            elif key == "cache":  # timeouts of new entries, FOPEN flags of new opens
                self.options = dataclasses.replace(self.options, cache=value)
                if self.pool is not None:
                    self.pool.options = self.options  # respawned workers too
                for slot in self.pool.live() if self.pool else ():
                    slot.channel.send({"kind": control.CACHE, "cache": value})
            elif key in ("metrics", "metrics_listen"):
                continue  # applied together below
            elif key == "workers" and self._grow_pool(new.worker_count):
                pass
            else:
                continue
            applied[key] = value
        if {"metrics", "metrics_listen"} & set(changed) and self._restart_metrics(new):
            applied.update({k: getattr(new, k) for k in ("metrics", "metrics_listen")
                            if k in changed})
        self.settings = old.replace(**applied)
        restart = [k for k in changed if k not in applied]
        log.info("configuration reloaded", extra={"fields": {
            "applied": ",".join(f"{k}={v}" for k, v in applied.items()) or "-",
            "needs_restart": ",".join(restart) or "-"}})
        set_log_level(self.settings.log_level)
        sdnotify.ready()

    def _grow_pool(self, count: int) -> bool:
        """More workers take effect at once; fewer would strand the fhs the extra workers own,
        so shrinking waits for a restart."""
        assert self.pool is not None
        if count <= len(self.pool.slots):
            return False
        for slot in self.pool.grow(count):
            self._watch(slot)
            self._resync(slot)
        return True

    def _restart_metrics(self, new: Settings) -> bool:
        assert self.pool is not None
        if self.pool.record_metrics != new.metrics:
            self.pool.record_metrics = new.metrics
            for slot in self.pool.live():
                slot.channel.send({"kind": control.METRICS, "on": new.metrics})
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if not new.metrics:
            return True
        assert self.book is not None
        server = MetricsServer(make_registry(self.book, self), new.metrics_listen)
        try:
            server.start()
        except OSError as e:
            log.error("cannot serve metrics on %s: %s", new.metrics_listen, e.strerror)
            return False
        self.metrics_server = server
        log.info("metrics at %s", server.url)
        return True

    def shutdown(self) -> None:
        sdnotify.stopping()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.pool is not None:
            if self.backend is not None:
                try:
                    self.quiesce(lambda key: True)
                except HaltServer:
                    pass
            self.pool.stop()
            log.info("requests served per worker: %s",
                     " ".join(f"w{i}={n}" for i, n in enumerate(self.pool.served())))
            self.pool.close()
        signal.set_wakeup_fd(-1)
        for sock in (self.conn, self.listener, self._signal_r, self._signal_w,
                     self.status_listener):
            if sock is not None:
                sock.close()
        if self.status_listener is not None:
            try:
                os.unlink(self.status_path)
            except FileNotFoundError:
                pass
        if self.listener is not None and self.settings.socket_path:
            try:
                os.unlink(self.settings.socket_path)
            except FileNotFoundError:
                pass
        if self.table is not None:
            self.table.close()
        os.close(self.completion_doorbell)
        self.epoll.close()
        if self.book is not None:
            self.book.close()
