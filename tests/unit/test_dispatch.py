"""The supervisor <-> worker rings and control channel, across real processes."""

import os

import pytest

from vfsd.dispatch import control
from vfsd.dispatch.channel import CB_SWEEP, FORGET_CAPACITY, WorkerChannel
from vfsd.dispatch.fh import fh_local, fh_owner, make_fh
from vfsd.dispatch.ring import (
    RingFull,
    SpscRing,
    pack_completion,
    pack_request,
    ring_bytes,
    unpack_completion,
    unpack_request,
)


def make_ring(capacity=8):
    return SpscRing(memoryview(bytearray(ring_bytes(capacity))), capacity)


def test_records_round_trip():
    assert unpack_request(pack_request(3, 65535, 2**32 - 1)) == (3, 65535, 2**32 - 1)
    assert unpack_completion(pack_completion(1, 7, 1 << 20)) == (1, 7, 1 << 20)
    # The record is the '<HHI' struct read as one u64.
    import struct

    assert struct.pack("<Q", pack_request(1, 2, 3)) == struct.pack("<HHI", 1, 2, 3)


def test_ring_fifo_and_full():
    ring = make_ring(8)
    ring.push([1, 2, 3])
    ring.push_one(4)
    assert len(ring) == 4
    assert ring.pop_all() == [1, 2, 3, 4]
    assert ring.pop_all() == []
    ring.push(list(range(8)))
    with pytest.raises(RingFull):
        ring.push_one(9)
    assert ring.free_slots() == 0
    assert ring.pop_all() == list(range(8))


def test_ring_index_wraps_at_u32():
    ring = make_ring(4)
    ring._hdr[0] = ring._hdr[16] = 2**32 - 2
    ring.push([10, 11, 12])
    assert len(ring) == 3
    assert ring.pop_all() == [10, 11, 12]
    assert ring._hdr[0] == 1


def test_capacity_must_be_power_of_two():
    with pytest.raises(ValueError):
        SpscRing(memoryview(bytearray(ring_bytes(6))), 6)


def test_sleep_protocol_never_loses_a_wakeup():
    ring = make_ring(8)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert ring.prepare_sleep()  # empty: may sleep
        ring.push_one(1)
        assert ring.wake_if_sleeping(efd)  # consumer announced sleep: doorbell rung
        assert os.eventfd_read(efd) == 1
        assert not ring.wake_if_sleeping(efd)  # flag cleared by the waker
        assert not ring.prepare_sleep()  # a record is waiting: do not sleep
    finally:
        os.close(efd)


def test_fh_owner_encoding():
    fh = make_fh(3, 12345)
    assert fh_owner(fh) == 3 and fh_local(fh) == 12345
    assert fh_owner(7) == -1  # not one of ours


def test_channel_across_fork():
    """A forked child consumes requests and answers completions through shared memory."""
    ch = WorkerChannel(0, capacity=64)
    ch.renew()
    done = os.eventfd(0)
    n = 5000
    pid = os.fork()
    if pid == 0:  # child: echo every request as a completion
        try:
            ch.control.close()
            msg, fds = control.recv(ch.worker_control)
            assert msg["kind"] == "hello" and len(fds) == 1
            os.close(fds[0])
            seen = 0
            while seen < n:
                recs = ch.requests.pop_all()
                if not recs:
                    if ch.requests.prepare_sleep() and _readable(ch.doorbell):
                        os.eventfd_read(ch.doorbell)
                    ch.requests.cancel_sleep()
                    continue
                for r in recs:
                    q, head, epoch = unpack_request(r)
                    while ch.completions.free_slots() == 0:
                        pass
                    ch.completions.push_one(pack_completion(q, head, epoch))
                    seen += 1
                ch.completions.wake_if_sleeping(done)
            os._exit(0)
        except BaseException:
            os._exit(1)
    ch.worker_control.close()
    r, w = os.pipe()
    assert ch.send({"kind": "hello"}, [r]) == 1
    os.close(r)
    os.close(w)
    sent = got = 0
    results = []
    while got < n:
        batch = []
        while sent < n and len(batch) < ch.requests.free_slots():
            batch.append(pack_request(1, sent % 65536, sent))
            sent += 1
        if batch:
            ch.requests.push(batch)
            ch.requests.wake_if_sleeping(ch.doorbell)
        for rec in ch.completions.pop_all():
            results.append(unpack_completion(rec)[2])
            got += 1
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert results == list(range(n))
    ch.close()
    os.close(done)


def _readable(fd):
    import select

    return bool(select.select([fd], [], [], 0.01)[0])


def test_forget_ring_overflow_asks_for_a_sweep():
    """Freed nodeids reach the worker in order; what does not fit sets CB_SWEEP (the worker
    then checks its whole cache): nothing is dropped silently."""
    channel = WorkerChannel(0)
    try:
        channel.renew()
        channel.forgotten([5, 6, 7])
        assert channel.forgets.pop_all() == [5, 6, 7] and not channel.block[CB_SWEEP]
        channel.forgotten(list(range(1, FORGET_CAPACITY)))
        assert not channel.block[CB_SWEEP]
        channel.forgotten([10**9, 10**9 + 1])  # one slot left: the second overflows
        assert channel.block[CB_SWEEP] == 1
        got = channel.forgets.pop_all()
        assert len(got) == FORGET_CAPACITY and got[-1] == 10**9
        channel.renew()
        assert not channel.block[CB_SWEEP] and not len(channel.forgets)
    finally:
        channel.close()
