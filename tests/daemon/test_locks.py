"""Blocking locks through the whole daemon: a SETLKW that must wait is answered later
(deferred), and meanwhile its worker keeps serving, with one worker and with four."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from tests.daemon.conftest import Session, connect
from tests.daemon_proc import Daemon
from tests.unit.fusereq import build, entry, open_fh
from vfsd.frontend.fuse_client import REQUEST_QUEUE
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode

EOF = (1 << 63) - 1


def lk(fh: int, owner: int, typ: int = fcntl.F_WRLCK, start: int = 0, end: int = EOF) -> bytes:
    return abi.LK_IN.pack(fh, owner, start, end, typ, 4321, 0, 0)


def header(data: bytes) -> tuple[int, int, int]:
    return abi.OUT_HEADER.unpack_from(data)


@pytest.mark.parametrize("workers", [1, 4])
def test_waiting_setlkw_is_answered_later_and_does_not_stall(tmp_path, workers):
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(b"data")
    daemon = Daemon(tmp_path, export, workers=workers)
    client = None
    try:
        client = connect(daemon, num_queues=2)
        s = Session(daemon, client)
        fuse = s.fuse
        assert fuse.init().error == 0
        n, _ = entry(fuse.lookup(1, b"f"))
        fh_a = open_fh(fuse.open(n, os.O_RDWR))[0]
        fh_b = open_fh(fuse.open(n, os.O_RDWR))[0]
        assert fuse.call(Opcode.SETLK, n, lk(fh_a, 0xA)).error == 0
        # B waits: the request is taken by its worker and not answered yet.
        waiting = client.submit(REQUEST_QUEUE, [build(Opcode.SETLKW, n, lk(fh_b, 0xB),
                                                      unique=9000)], [16])
        assert client.wait(REQUEST_QUEUE, timeout=0.5) == []
        # Meanwhile every worker (the waiting one included) keeps serving.
        for _ in range(2 * workers):
            assert fuse.getattr(n).error == 0
            assert fuse.read(n, fh_b, 0, 4).body == b"data"
        # The host sees A's lock.
        fd = os.open(export / "f", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        # A unlocks: both the unlock and the waiting SETLKW complete.
        unlock = client.submit(REQUEST_QUEUE, [build(Opcode.SETLK, n, lk(fh_a, 0xA, fcntl.F_UNLCK),
                                                     unique=9002)], [16])
        done = {c.head: c for c in client.wait(REQUEST_QUEUE, timeout=10, count=2)}
        assert set(done) == {waiting, unlock}
        assert header(done[unlock].data) == (16, 0, 9002)
        assert header(done[waiting].data) == (16, 0, 9000) and done[waiting].used_len == 16
        # B holds it now.
        assert fuse.call(Opcode.SETLK, n, lk(fh_a, 0xA, start=0, end=0)).error == errno.EAGAIN
        assert fuse.release(n, fh_a).error == 0
        assert fuse.release(n, fh_b).error == 0
        assert "Traceback" not in daemon.log()
    finally:
        if client is not None:
            client.close()
        daemon.stop()



@pytest.mark.parametrize("path", ["hiprio", "stop"])
def test_waiting_setlkw_is_cancelled_by_interrupt_or_ring_stop(tmp_path, path):
    """INTERRUPT (hiprio) cancels a waiting SETLKW with EINTR; a ring stop (VM pause,
    GET_VRING_BASE) must not wait for the lock either: the SETLKW answers ENOLCK."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_bytes(b"data")
    with Daemon(tmp_path, export, workers=2) as daemon:
        client = connect(daemon, num_queues=2)
        fuse = Session(daemon, client).fuse
        assert fuse.init().error == 0
        n, _ = entry(fuse.lookup(1, b"f"))
        fh_a = open_fh(fuse.open(n, os.O_RDWR))[0]
        fh_b = open_fh(fuse.open(n, os.O_RDWR))[0]
        assert fuse.call(Opcode.SETLK, n, lk(fh_a, 0xA)).error == 0
        client.submit(REQUEST_QUEUE, [build(Opcode.SETLKW, n, lk(fh_b, 0xB), unique=7000)],
                      [16])
        assert client.wait(REQUEST_QUEUE, timeout=0.5) == []
        if path == "hiprio":
            client.submit(0, [build(Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(7000),
                                    unique=7001)], [])
            assert len(client.wait(0, timeout=5)) == 1
            (done,) = client.wait(REQUEST_QUEUE, timeout=5)
            assert header(done.data)[1] == -errno.EINTR
        else:
            import time

            t0 = time.monotonic()
            client.stop()  # GET_VRING_BASE completes in-flight requests first
            assert time.monotonic() - t0 < 10
            (done,) = client.queues[REQUEST_QUEUE].reap()
            assert header(done.data)[1] == -errno.ENOLCK
        client.close()
        assert daemon.wait(10) == 0
