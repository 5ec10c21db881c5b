"""Single-producer/single-consumer rings of 64-bit records in shared memory.

Layout of one ring inside a buffer (all little-endian, each header field on its own cache
line so producer and consumer do not false-share):

    offset   0  u32 head      written by the producer only (free-running)
    offset  64  u32 tail      written by the consumer only (free-running)
    offset 128  u32 sleeping  set by the consumer before it blocks, cleared by whoever wakes it
    offset 192  u64 slots[capacity]

Every store another process reads concurrently is one aligned store through a
`memoryview.cast` element (struct.pack_into zero-fills first: PROTOCOLS.md trap 23). A record
is written before `head` is published, so the consumer never sees a half-written record.

Wake-ups: the consumer sets `sleeping`, issues a full fence and re-checks the ring before it
blocks on its eventfd; the producer fences after publishing and rings the eventfd only if
`sleeping` is set. The fence orders the store of one side against its load of the other
side's field (the only reordering x86 does), so a wake-up cannot be lost.
"""

from __future__ import annotations

import os
from array import array

from vfsd.fence import full_fence

_HEAD = 0  # u32 index into the cast('I') header view
_TAIL = 16
_SLEEPING = 32
HEADER_BYTES = 192
_U32 = 0xFFFFFFFF

def ring_bytes(capacity: int) -> int:
    """Bytes one ring of `capacity` records occupies."""
    return HEADER_BYTES + 8 * capacity


class RingFull(Exception):
    """The producer tried to push more records than the ring has room for."""


class SpscRing:
    """One direction of a worker's channel: a bounded queue of u64 records."""

    __slots__ = ("_hdr", "_mask", "_slots", "capacity")

    def __init__(self, buf: memoryview, capacity: int) -> None:
        if capacity <= 0 or capacity & (capacity - 1):
            raise ValueError("ring capacity must be a power of two")
        if len(buf) < ring_bytes(capacity):
            raise ValueError("buffer too small for the ring")
        self.capacity = capacity
        self._mask = capacity - 1
        self._hdr = buf[:HEADER_BYTES].cast("I")
        self._slots = buf[HEADER_BYTES : ring_bytes(capacity)].cast("Q")

    def reset(self) -> None:
        """Empty the ring (only while neither side runs)."""
        self._hdr[_HEAD] = 0
        self._hdr[_TAIL] = 0
        self._hdr[_SLEEPING] = 0

    # producer side
    def free_slots(self) -> int:
        return self.capacity - ((self._hdr[_HEAD] - self._hdr[_TAIL]) & _U32)

    def push(self, records: list[int]) -> None:
        """Append records and publish them with one store of `head`."""
        hdr = self._hdr
        head = hdr[_HEAD]
        if len(records) > self.capacity - ((head - hdr[_TAIL]) & _U32):
            raise RingFull(f"{len(records)} records do not fit")
        n = len(records)
        start = head & self._mask
        end = start + n
        if end <= self.capacity:  # one slice store (records land before head is published)
            self._slots[start:end] = array("Q", records)
        else:  # wraps: two slice stores
            split = self.capacity - start
            self._slots[start:] = array("Q", records[:split])
            self._slots[: end - self.capacity] = array("Q", records[split:])
        hdr[_HEAD] = (head + n) & _U32

    def push_one(self, record: int) -> None:
        hdr = self._hdr
        head = hdr[_HEAD]
        if ((head - hdr[_TAIL]) & _U32) >= self.capacity:
            raise RingFull("ring full")
        self._slots[head & self._mask] = record
        hdr[_HEAD] = (head + 1) & _U32

    def wake_if_sleeping(self, eventfd: int) -> bool:
        """After publishing: ring the consumer's doorbell if it is (about to be) asleep."""
        full_fence()
        if self._hdr[_SLEEPING]:
            self._hdr[_SLEEPING] = 0
            os.eventfd_write(eventfd, 1)
            return True
        return False

    # consumer side
    def __len__(self) -> int:
        return (self._hdr[_HEAD] - self._hdr[_TAIL]) & _U32

    def pop_all(self) -> list[int]:
        """Take every published record, oldest first."""
        hdr = self._hdr
        tail = hdr[_TAIL]
        n = (hdr[_HEAD] - tail) & _U32
        if not n:
            return []
        if n > self.capacity:
            raise RuntimeError(f"ring corrupted: {n} records in a ring of {self.capacity}")
        start = tail & self._mask
        end = start + n
        if end <= self.capacity:
            out = self._slots[start:end].tolist()
        else:
            out = self._slots[start:].tolist() + self._slots[: end - self.capacity].tolist()
        hdr[_TAIL] = (tail + n) & _U32
        return out

    def prepare_sleep(self) -> bool:
        """Announce that the consumer will block; False if records arrived meanwhile."""
        self._hdr[_SLEEPING] = 1
        full_fence()
        if (self._hdr[_HEAD] - self._hdr[_TAIL]) & _U32:
            self._hdr[_SLEEPING] = 0
            return False
        return True

    def cancel_sleep(self) -> None:
        self._hdr[_SLEEPING] = 0


# Record encodings. Both are '<HHI' read as one little-endian u64.
def pack_request(queue: int, head: int, epoch: int) -> int:
    return queue | head << 16 | (epoch & _U32) << 32


def unpack_request(record: int) -> tuple[int, int, int]:
    return record & 0xFFFF, (record >> 16) & 0xFFFF, record >> 32


def pack_completion(queue: int, head: int, length: int) -> int:
    return queue | head << 16 | length << 32


def unpack_completion(record: int) -> tuple[int, int, int]:
    return record & 0xFFFF, (record >> 16) & 0xFFFF, record >> 32
