"""Workers return their own chains to the guest: what must keep working around that.

A worker killed while it holds a queue's used-ring lock, a call fd replaced while requests
are in flight, and a barrier (GET_VRING_BASE) that times out on a stuck worker.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import threading
import time

from tests.daemon.conftest import Session, connect
from tests.daemon_proc import Daemon
from tests.unit.fusereq import build
from vfsd import status
from vfsd.dispatch.used import OWNER_OFFSET
from vfsd.frontend.fuse_client import IN_SIZE, OUT_SIZE
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode

QUEUE = 1
GETATTR = build(Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0))


def getattrs(n: int, first_unique: int) -> list[tuple[bytes, int]]:
    """Pipelined GETATTRs of the root, each with its own unique (replay goes by unique)."""
    return [(build(Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0), unique=first_unique + 2 * i),
             abi.ATTR_OUT.size) for i in range(n)]


def worker_pids(daemon: Daemon) -> list[int]:
    return [w["pid"] for w in status.query(daemon.socket_path + ".status")["workers"]]


def used_lock_owner(daemon: Daemon, pid: int) -> int:
    """The `owner` word of queue 1's used-ring lock, read from the worker's own mapping."""
    name = f"/dev/shm/vfsd-{daemon.proc.pid}-used{QUEUE}"
    with open(f"/proc/{pid}/maps") as maps:
        start = next(int(line.split("-")[0], 16) for line in maps if name in line)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(start + OWNER_OFFSET)
        return struct.unpack("<I", mem.read(4))[0]


@contextlib.contextmanager
def running(tmp_path, workers: int, **client_kw):
    """A daemon on a fresh export with a connected, INITed client: (daemon, client, fuse)."""
    export = tmp_path / "export"
    export.mkdir()
    with Daemon(tmp_path, export, workers=workers) as daemon:
        client = connect(daemon, num_queues=2, **client_kw)
        fuse = Session(daemon, client).fuse
        assert fuse.init().error == 0
        try:
            yield daemon, client, fuse
        finally:
            client.close()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_worker_killed_holding_the_used_ring_lock(tmp_path):
    """Under a pipelined GETATTR load, stop the worker until it is caught inside the used
    ring's critical section, SIGKILL it there: the supervisor repairs the lock, replays the
    requests it had not returned, and every request of the load is answered once, OK."""
    with running(tmp_path, 1, queue_size=256) as (daemon, _client, fuse):
        stop = threading.Event()
        failures: list[str] = []
        rounds = [0]

        def load() -> None:
            try:
                unique = 1 << 20
                while not stop.is_set():
                    replies = fuse.server.call_many(getattrs(256, unique), 64)
                    unique += 512
                    if len(replies) != 256:
                        failures.append(f"{len(replies)} of 256 answered")
                    bad = [r for r in replies if r[0] != OUT_SIZE + abi.ATTR_OUT.size]
                    if bad:
                        failures.append(f"{len(bad)} bad replies")
                    rounds[0] += 1
            except Exception as e:  # reported by the main thread
                failures.append(repr(e))

        thread = threading.Thread(target=load)
        thread.start()
        rng = random.Random(1)
        caught = False
        (pid,) = worker_pids(daemon)
        try:
            for _ in range(10000):
                os.kill(pid, signal.SIGSTOP)
                if used_lock_owner(daemon, pid) == 1:  # worker 0 holds it
                    os.kill(pid, signal.SIGKILL)
                    caught = True
                    break
                os.kill(pid, signal.SIGCONT)
                time.sleep(rng.uniform(0, 0.002))
            assert caught, "never caught the worker holding the lock"
            wait_for(lambda: "died holding the used-ring lock" in daemon.log())
            done = rounds[0]
            wait_for(lambda: rounds[0] >= done + 3 or bool(failures))  # the queue goes on
        finally:
            stop.set()
            thread.join(30)
        assert not failures, failures
        assert fuse.getattr(1).error == 0


def test_call_fd_replaced_while_requests_are_in_flight(tmp_path):
    """SET_VRING_CALL with a new eventfd right after a burst was kicked: every completion of
    this and later bursts is signalled on the new fd (the old one is closed, as QEMU may)."""
    with running(tmp_path, 2) as (_daemon, client, _fuse):
        def burst(replace: bool) -> None:
            for _ in range(16):
                client.submit(QUEUE, [GETATTR[:IN_SIZE], GETATTR[IN_SIZE:]],
                              [OUT_SIZE, abi.ATTR_OUT.size], kick=False)
            client.kick(QUEUE, force=True)
            if replace:
                client.replace_call_fd(QUEUE)
            # wait() sleeps on the current call fd: without a signal there it only finds the
            # completions when it gives up (timeout).
            t0 = time.monotonic()
            done = client.wait(QUEUE, timeout=3, count=16)
            assert len(done) == 16 and time.monotonic() - t0 < 2, "no interrupt on the new fd"
            assert all(c.used_len == OUT_SIZE + abi.ATTR_OUT.size for c in done)

        for _ in range(20):
            burst(replace=True)  # in flight while the fd changes
            burst(replace=False)  # after: only the new fd is signalled


def test_barrier_timeout_kills_the_stuck_worker_and_answers_once(tmp_path, monkeypatch):
    """GET_VRING_BASE while the only worker is stopped with a GETATTR and a MKDIR: after
    VFSD_QUIESCE_TIMEOUT the supervisor kills it (a late write can no longer land), replays
    the GETATTR on its successor and answers the MKDIR EIO: each head comes back once."""
    monkeypatch.setenv("VFSD_QUIESCE_TIMEOUT", "1")
    with running(tmp_path, 1) as (daemon, client, fuse):
        (pid,) = worker_pids(daemon)
        os.kill(pid, signal.SIGSTOP)
        try:
            before = client.queues[QUEUE].used_idx
            client.submit(QUEUE, [GETATTR[:IN_SIZE], GETATTR[IN_SIZE:]],
                          [OUT_SIZE, abi.ATTR_OUT.size], kick=False)
            mkdir = build(Opcode.MKDIR, 1, abi.MKDIR_IN.pack(0o755, 0) + b"d\0", unique=8)
            client.submit(QUEUE, [mkdir[:IN_SIZE], mkdir[IN_SIZE:]],
                          [OUT_SIZE, abi.ENTRY_OUT.size], kick=True)
            time.sleep(0.3)  # routed to the stopped worker
            t0 = time.monotonic()
            client.stop_queue(QUEUE)  # the barrier
            assert time.monotonic() - t0 >= 0.9
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        done = client.wait(QUEUE, timeout=5, count=2)
        assert client.queues[QUEUE].used_idx - before == 2
        errors = sorted(struct.unpack_from("<i", c.data, 4)[0] for c in done)
        assert errors == [-5, 0]  # MKDIR EIO, GETATTR replayed
        assert "killing it" in daemon.log() and "replayed 1 requests" in daemon.log()
        client.start_queue(QUEUE)
        assert fuse.getattr(1).error == 0
