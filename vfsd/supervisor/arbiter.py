"""The supervisor: vhost-user device, hiprio queue, request routing and the poll loop.

One loop (epoll) waits on the vhost-user socket, the kick eventfds, the signal pipe and the
workers' sentinels. Each turn: handle what woke it, then read the workers' completion records
(bookkeeping only: workers return their chains to the guest themselves). Request queues are
drained in one go per kick; each chain is routed by its fuse_in_header (and fh) to a worker
ring, once-per-batch doorbells.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from vfsd import sdnotify, status
from vfsd.affinity import parse_cpulist, usable
from vfsd.config import Settings
from vfsd.dispatch.used import SUPERVISOR, UsedLock, UsedRing
from vfsd.fs.inode_table import InodeTable
from vfsd.metrics.collector import make_registry
from vfsd.metrics.http import MetricsServer
from vfsd.metrics.slab import MetricsBook
from vfsd.pool import HaltServer, WorkerPool, WorkerSlot
from vfsd.supervisor.completion import Completion
from vfsd.supervisor.device import Device
from vfsd.supervisor.hiprio import Hiprio
from vfsd.supervisor.operations import Operations
from vfsd.supervisor.recovery import Recovery
from vfsd.supervisor.routing import Routing
from vfsd.supervisor.session import SessionBarriers
from vfsd.supervisor.startup import StartupError, listen, listen_status, set_nofile_limit
from vfsd.supervisor.wire import HIPRIO
from vfsd.transport.backend import VhostUserBackend
from vfsd.transport.memory import GuestMemory
from vfsd.transport.virtqueue import Vring
from workers.passthrough.fs import ExportError, check_export

log = logging.getLogger("vfsd.supervisor")


class Supervisor(Device, Routing, Completion, Hiprio, SessionBarriers, Recovery, Operations):
    """The arbiter: set up, then one epoll loop until the front-end goes or a signal stops it."""

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
        self.used_locks: dict[int, UsedLock] = {}
        self.used: dict[int, UsedRing] = {}
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
        for queue in range(HIPRIO + 1, HIPRIO + 1 + self.settings.num_queues):
            lock = self.used_locks[queue] = UsedLock(queue)
            self.used[queue] = UsedRing(lock, SUPERVISOR)
        workers = self.settings.worker_count
        self.book = MetricsBook(workers)
        self.pool = WorkerPool(workers, self.table, self.options, self.completion_doorbell,
                               self.book, self.used_locks)
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
        fds += [u.call_fd for u in self.used.values() if u.call_fd is not None]
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
        # Workers return their own chains, so nothing here waits for a completion; their
        # completion records are read at the end of every turn (an idle daemon: once a second).
        events = self.epoll.poll(1.0)
        for fd, _mask in events:
            # Kicks are edge-triggered (EDGE): every write wakes epoll, so their counters need
            # no read — a syscall less per kick.
            if fd in self.kick_fds:
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
        for writer in self.used.values():
            writer.close()
        for lock in self.used_locks.values():
            lock.close()
        if self.table is not None:
            self.table.close()
        os.close(self.completion_doorbell)
        self.epoll.close()
        if self.book is not None:
            self.book.close()
