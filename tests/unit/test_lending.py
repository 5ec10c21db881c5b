"""The lending table: another process's fd borrowed by fh, with the checks around it."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from vfsd.dispatch.fh import make_fh
from workers.passthrough.handles import Handle, Lending


@pytest.fixture
def owners():
    """Fork processes that open a file and publish it as worker 0's fh; all killed after."""
    pids: list[int] = []

    def start(lending: Lending, path: str, fh: int) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: publish, then wait to be killed
            try:
                os.close(r)
                fd = os.open(path, os.O_RDONLY)
                lending.publish(0, fh & 0xFFF, fh, Handle(fd, 7, os.O_RDONLY, False))
                os.write(w, b"x")
                signal.pause()
            finally:
                os._exit(0)
        pids.append(pid)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.close(r)
        return pid

    yield start
    for pid in pids:
        stop(pid)


def stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_borrow_checks_the_fh_and_survives_a_stale_pidfd(tmp_path, owners):
    path = tmp_path / "f"
    path.write_bytes(b"owned data")
    lending = Lending(workers=2)
    fh = make_fh(0, 1 << 12 | 5)  # sequence 1, slot 5
    first = owners(lending, str(path), fh)
    fd, is_dir = lending.borrow(fh)
    assert (os.pread(fd, 5, 0), is_dir) == (b"owned", False)
    os.close(fd)
    stale = lending._pidfds[first]
    stop(first)
    # A new owner whose pid the cache maps to the dead one's pidfd (pid reuse): the borrow
    # notices the stale pidfd and opens a fresh one.
    second = owners(lending, str(path), fh)
    lending._pidfds[second] = os.dup(stale)
    fd, _ = lending.borrow(fh)
    assert os.pread(fd, 4, 6) == b"data"
    os.close(fd)
    with pytest.raises(OSError) as e:
        lending.borrow(make_fh(0, 2 << 12 | 5))  # same slot, another sequence: not that fh
    assert e.value.errno == errno.EBADF
    # The owner dies: its fds can no longer be borrowed, its handles wait for a successor.
    lending.orphan(0)
    with pytest.raises(OSError) as e:
        lending.borrow(fh)
    assert e.value.errno == errno.EBADF
    assert lending.orphans(0) == [(5, fh, 7, os.O_RDONLY, False)]
    lending.withdraw(0, 5)
    assert lending.orphans(0) == []
    with pytest.raises(OSError) as e:
        lending.borrow(fh)  # released
    assert e.value.errno == errno.EBADF
    for pidfd in lending._pidfds.values():
        os.close(pidfd)
