"""The worker pool: spawn, watch, reap and respawn worker processes (gunicorn's arbiter verbs).

The pool owns one `WorkerChannel` per slot. A slot keeps its channel across restarts; each
spawn bumps the slot's incarnation, which the worker folds into every fh it issues, so an fh
of a dead incarnation can never name a file of the new one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import multiprocess

from vfsd.dispatch.channel import CB_SERVED, WorkerChannel
from vfsd.dispatch.used import UsedLock
from vfsd.fs.inode_table import InodeTable
from vfsd.fuse.options import FsOptions
from vfsd.metrics.slab import MetricsBook
from workers import main as worker_main

log = logging.getLogger("vfsd.pool")

_fork = multiprocess.get_context("fork")

STOP_TIMEOUT = 5.0
REAP_TIMEOUT = 2.0
RESTART_WINDOW = 10.0  # seconds
MAX_RESTARTS_IN_WINDOW = 5  # a slot failing faster than this halts the daemon


class HaltServer(Exception):
    """A worker cannot run at all (boot error or a restart loop): stop the daemon."""


class WorkerSlot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.channel = WorkerChannel(index)
        self.process: multiprocess.Process | None = None
        self.incarnation = 0
        self.restarts: list[float] = []
        # In-flight requests: (queue << 16 | head) -> (opcode, nodeid, unique, start ns).
        self.inflight: dict[int, tuple[int, int, int, int]] = {}

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def sentinel(self) -> int | None:
        return self.process.sentinel if self.process is not None else None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class WorkerPool:
    def __init__(self, size: int, table: InodeTable, options: FsOptions,
                 completion_doorbell: int, book: MetricsBook,
                 used_locks: dict[int, UsedLock]) -> None:
        self.table = table
        self.book = book
        self.record_metrics = True
        self.worker_cpus: frozenset[int] | None = None  # sched_setaffinity in each worker
        self.options = options
        self.completion_doorbell = completion_doorbell
        self.used_locks = used_locks
        self.slots = [WorkerSlot(i) for i in range(size)]
        self.close_in_child: Callable[[], tuple[int | socket.socket, ...]] = tuple

    def spawn(self, slot: WorkerSlot) -> None:
        channel = slot.channel
        channel.renew()
        slot.incarnation += 1
        spec = worker_main.WorkerSpec(
            index=slot.index,
            incarnation=slot.incarnation,
            channel=channel,
            completion_doorbell=self.completion_doorbell,
            used_locks=self.used_locks,
            table=self.table,
            options=self.options,
            close_fds=self.close_in_child(),
            metrics_slab=self.book.renew(slot.index),  # folds the dead incarnation's counts
            record_metrics=self.record_metrics,
            cpus=self.worker_cpus,
        )
        process = _fork.Process(target=worker_main.run, args=(spec,), daemon=True,
                                name=f"vfsd-worker-{slot.index}")
        process.start()
        assert channel.worker_control is not None
        channel.worker_control.close()
        channel.worker_control = None
        slot.process = process
        log.info("worker %d started", slot.index,
                 extra={"fields": {"pid": process.pid, "incarnation": slot.incarnation}})

    def grow(self, count: int) -> list[WorkerSlot]:
        """Add and start slots up to `count` workers; returns the new slots."""
        new = [WorkerSlot(i) for i in range(len(self.slots), count)]
        self.slots.extend(new)
        for slot in new:
            self.spawn(slot)
        return new

    def spawn_all(self) -> None:
        for slot in self.slots:
            self.spawn(slot)

    def reap(self, slot: WorkerSlot) -> int | None:
        """Collect a dead worker; returns its exit code (negative = signal), None if alive."""
        process = slot.process
        if process is None:
            return None
        # The sentinel closes while the process exits, a moment before it can be waited for.
        process.join(REAP_TIMEOUT)
        if process.exitcode is None:
            return None
        code = process.exitcode
        slot.process = None
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (perhaps out of memory)" if -code == signal.SIGKILL else ""
            log.error("worker %d (pid %s) killed by %s%s", slot.index, process.pid, name, hint)
        else:
            log.error("worker %d (pid %s) exited with code %s", slot.index, process.pid, code)
        if code == worker_main.EXIT_BOOT_ERROR:
            raise HaltServer(f"worker {slot.index} failed to boot")
        now = time.monotonic()
        slot.restarts = [t for t in slot.restarts if now - t < RESTART_WINDOW] + [now]
        if len(slot.restarts) > MAX_RESTARTS_IN_WINDOW:
            raise HaltServer(f"worker {slot.index} died {len(slot.restarts)} times in "
                             f"{RESTART_WINDOW:.0f} s")
        return code

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask every worker to finish its ring and exit; SIGKILL stragglers."""
        for slot in self.slots:
            if slot.alive:
                try:
                    slot.channel.send({"kind": "stop"})
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                log.warning("worker %d did not stop in time; killing it", slot.index)
                slot.process.kill()
                slot.process.join(1.0)
            slot.process = None

    def served(self) -> list[int]:
        """Requests each slot's current worker has completed."""
        return [slot.channel.block[CB_SERVED] for slot in self.slots]

    def close(self) -> None:
        for slot in self.slots:
            slot.channel.close()

    def live(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.process is not None]

    def kill(self, slot: WorkerSlot, sig: int = signal.SIGKILL) -> None:
        if slot.pid is not None:
            try:
                os.kill(slot.pid, sig)
            except ProcessLookupError:
                pass
