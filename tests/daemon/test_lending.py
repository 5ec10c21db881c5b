"""READ and large WRITE of one open file spread over workers (fd lending), with every byte
checked on both sides; a released fh cannot be borrowed; a dead owner's open files are
reopened by its successor."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
import time
from types import SimpleNamespace

from tests.daemon.conftest import Session, connect
from tests.daemon_proc import Daemon
from vfsd.dispatch.fh import fh_owner
from vfsd.frontend.fuse_client import REQUEST_QUEUE, build, entry, open_fh
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode

CHUNK = 128 << 10  # above the supervisor's lending threshold for WRITE (64 KiB)
CHUNKS = 32


def ok(reply):
    assert reply.error == 0, f"errno {reply.error} ({os.strerror(reply.error)})"
    return reply


def pattern(i: int) -> bytes:
    return (struct.pack("<I", i) * (CHUNK // 4))[:CHUNK]


def burst(client, requests, reply_size):
    """Submit every request before kicking once, so the owner is busy while they route."""
    heads = {client.submit(REQUEST_QUEUE, [req], [16, reply_size], kick=False): i
             for i, req in enumerate(requests)}
    client.kick(REQUEST_QUEUE, force=True)
    done = client.wait(REQUEST_QUEUE, timeout=20, count=len(requests))
    assert len(done) == len(requests)
    out = [b""] * len(requests)
    for c in done:
        length, error, _unique = abi.OUT_HEADER.unpack_from(c.data)
        assert error == 0, f"errno {-error}"
        assert length == c.used_len
        out[heads[c.head]] = c.data[16:c.used_len]
    return out


def concurrent_read_errors(client, nodeid: int, fh: int, count: int = 8) -> list[int]:
    """The errnos of `count` READs of `fh` sent together, each large enough to be lent."""
    reads = [build(Opcode.READ, nodeid, abi.READ_IN.pack(fh, 0, CHUNK, 0, 0, 0, 0),
                   unique=9000 + 2 * i) for i in range(count)]
    heads = [client.submit(REQUEST_QUEUE, [r], [16, CHUNK], kick=False) for r in reads]
    client.kick(REQUEST_QUEUE, force=True)
    done = client.wait(REQUEST_QUEUE, timeout=20, count=len(heads))
    assert len(done) == count
    return [-abi.OUT_HEADER.unpack_from(c.data)[1] for c in done]


@contextlib.contextmanager
def running(tmp_path, workers: int, files: dict[str, bytes] | None = None):
    """An export (with `files`), vfsd with `workers`, a client after INIT. On exit the
    client goes, vfsd must exit 0, and `served` holds the per-worker request counts."""
    export = tmp_path / "export"
    export.mkdir()
    for name, data in (files or {}).items():
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        (export / name).write_bytes(data)
    with Daemon(tmp_path, export, workers=workers) as daemon:
        client = connect(daemon, num_queues=2)
        run = SimpleNamespace(daemon=daemon, client=client, export=export, served=None,
                              fuse=Session(daemon, client).fuse)
        ok(run.fuse.init())
        yield run
        client.close()
        assert daemon.wait(10) == 0
        run.served = daemon.served_per_worker()


def kill_worker(daemon, index: int, wait_for: str) -> None:
    """SIGKILL worker `index` and wait until the log says `wait_for`."""
    os.kill(_worker_pid(daemon, index), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and wait_for not in daemon.log():
        time.sleep(0.05)
    assert wait_for in daemon.log(), daemon.log()


def test_one_fh_keeps_two_workers_busy(tmp_path):
    with running(tmp_path, workers=2) as run:
        client, fuse, export = run.client, run.fuse, run.export
        reply = ok(fuse.create(1, b"big", flags=os.O_RDWR, mode=0o644))
        nodeid, _ = entry(reply)
        fh, _ = open_fh(reply, 128)
        for rnd in range(3):  # large WRITEs, several rounds so both workers get some
            writes = [build(Opcode.WRITE, nodeid,
                            abi.WRITE_IN.pack(fh, i * CHUNK, CHUNK, 0, 0, 0, 0) + pattern(i),
                            unique=2 + 2 * i + 1000 * rnd) for i in range(CHUNKS)]
            for body in burst(client, writes, 16):
                assert abi.WRITE_OUT.unpack_from(body)[0] == CHUNK
        data = (export / "big").read_bytes()
        assert data == b"".join(pattern(i) for i in range(CHUNKS))
        for rnd in range(3):
            reads = [build(Opcode.READ, nodeid,
                           abi.READ_IN.pack(fh, i * CHUNK, CHUNK, 0, 0, 0, 0),
                           unique=2 + 2 * i + 1000 * rnd) for i in range(CHUNKS)]
            assert burst(client, reads, CHUNK) == [pattern(i) for i in range(CHUNKS)]
        ok(fuse.release(nodeid, fh))
        # After RELEASE nothing is left to borrow: a stale fh is EBADF on every worker.
        assert concurrent_read_errors(client, nodeid, fh) == [errno.EBADF] * 8
    # Without lending the owner would have served every READ/WRITE.
    assert len(run.served) == 2 and min(run.served) > 20, run.served


def test_fh_of_a_dead_owner_is_served_again_by_its_successor(tmp_path):
    """Lent READs of a dead owner's fh: never another process's fd; once the successor has
    reopened the file, owner and borrowers serve it again."""
    with running(tmp_path, workers=2, files={"f": pattern(3)}) as run:
        nodeid, _ = entry(ok(run.fuse.lookup(1, b"f")))
        fh, _ = open_fh(ok(run.fuse.open(nodeid, os.O_RDWR)))
        owner = fh_owner(fh)
        kill_worker(run.daemon, owner, f"worker {owner} reopened 1 open files")
        reads = [build(Opcode.READ, nodeid, abi.READ_IN.pack(fh, 0, CHUNK, 0, 0, 0, 0),
                       unique=2 + 2 * i) for i in range(8)]
        assert burst(run.client, reads, CHUNK) == [pattern(3)] * 8


def _worker_pid(daemon, index: int) -> int:
    for line in daemon.log().splitlines():
        if f"worker {index} started pid=" in line:
            return int(line.split("pid=")[1].split()[0])
    raise AssertionError(f"no start line for worker {index}: {daemon.log()}")


def test_a_dead_workers_open_files_are_reopened_by_its_successor(tmp_path):
    with running(tmp_path, workers=2, files={f"d/{n}": b"" for n in "abc"}) as run:
        fuse, export = run.fuse, run.export
        reply = ok(fuse.create(1, b"f", flags=os.O_RDWR | os.O_TRUNC, mode=0o644))
        nodeid, _ = entry(reply)
        fh, _ = open_fh(reply, 128)
        ok(fuse.write(nodeid, fh, 0, b"before the crash"))
        dir_id, _ = entry(ok(fuse.lookup(1, b"d")))
        dir_fh, _ = open_fh(ok(fuse.opendir(dir_id)))
        owner = fh_owner(fh)
        kill_worker(run.daemon, owner, f"worker {owner} reopened")
        # The guest's fhs work on: same file, O_TRUNC not applied again.
        assert ok(fuse.read(nodeid, fh, 0, 100)).body == b"before the crash"
        ok(fuse.write(nodeid, fh, 0, b"AFTER"))
        assert (export / "f").read_bytes() == b"AFTERe the crash"
        if fh_owner(dir_fh) == owner:  # the dir handle may have landed on the other worker
            assert b"a" in ok(fuse.readdir(dir_id, dir_fh)).body
        ok(fuse.release(nodeid, fh))
        ok(fuse.releasedir(dir_id, dir_fh))


def test_requests_of_a_dead_worker_that_change_nothing_run_again(tmp_path):
    """GETATTR/READ in flight on a worker that dies are answered by its successor; a
    request that changes something (MKDIR) gets EIO, as the guest cannot know if it ran."""
    with running(tmp_path, workers=1, files={"f": pattern(5)}) as run:
        client, fuse, daemon = run.client, run.fuse, run.daemon
        nodeid, _ = entry(ok(fuse.lookup(1, b"f")))
        fh, _ = open_fh(ok(fuse.open(nodeid, os.O_RDONLY)))
        pid = _worker_pid(daemon, 0)
        os.kill(pid, signal.SIGSTOP)  # the worker holds what it is sent, then dies
        requests = [
            (build(Opcode.GETATTR, nodeid, abi.GETATTR_IN.pack(0, 0, 0), unique=1000), 104),
            (build(Opcode.READ, nodeid, abi.READ_IN.pack(fh, 0, CHUNK, 0, 0, 0, 0),
                   unique=1002), CHUNK),
            (build(Opcode.MKDIR, 1, abi.MKDIR_IN.pack(0o755, 0) + b"new\0", unique=1004), 128),
        ]
        heads = {client.submit(REQUEST_QUEUE, [req], [16, size], kick=False): i
                 for i, (req, size) in enumerate(requests)}
        client.kick(REQUEST_QUEUE, force=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _inflight(daemon) >= 3:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        done = client.wait(REQUEST_QUEUE, timeout=20, count=3)
        assert len(done) == 3
        by_index = {heads[c.head]: c for c in done}
        errors = [-abi.OUT_HEADER.unpack_from(by_index[i].data)[1] for i in range(3)]
        assert errors == [0, 0, errno.EIO], daemon.log()
        assert by_index[1].data[16:by_index[1].used_len] == pattern(5)
        assert "replayed 2 requests of dead worker 0" in daemon.log()


def _inflight(daemon) -> int:
    from vfsd import status

    return status.query(daemon.socket_path + ".status")["inflight_total"]
