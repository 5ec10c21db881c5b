"""Descriptor-chain walking: `read_chain` (the general walk and the vectorised `_walk_linear`
for long indirect tables), `peek_chain` and the supervisor's `peek_buffers`, against a
reference walk written straight from the spec (PROTOCOLS.md B.2).

Guest memory: two regions with a hole, [0, 64K) and [128K, 192K), filled with a pattern in
which every 4-byte word holds its own file offset, so the bytes a view shows say where it
points. Input: `u8` queue size (1 << n % 9), `u16` head, `u16` peek length, then an image
written at GPA 0, where the descriptor table starts (indirect tables live there too).

Documented errors: `ChainError` (and `peek_buffers` returns None for shapes it declines).
Invariants: `read_chain` succeeds exactly when the reference does, with the same readable
and writable bytes; `peek_chain` then returns the readable part's prefix; `peek_buffers`,
when it answers, names the chain's first (and second) readable buffer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from tests.fuzz.harness import Broken, Reader, Writer
from vfsd.transport import ChainError
from vfsd.transport.abi import DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from vfsd.transport.memory import GuestMemory, MemRegion
from vfsd.transport.virtqueue import peek_buffers, peek_chain, read_chain

MAX_LEN = 8192
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
LOW = MemRegion(0, 0x10000, 0x7000_0000, 0)
HIGH = MemRegion(0x20000, 0x10000, 0x7002_0000, 0x10000)
_COMPARE_MAX = 1 << 20
_PATTERN = struct.pack("<16384I", *range(0, 0x10000, 4))  # the low region's initial bytes

_ram = -1
_mem: GuestMemory | None = None


def prepare() -> None:
    global _ram, _mem
    _ram = os.memfd_create("fuzz-chain-ram", os.MFD_CLOEXEC)
    os.pwrite(_ram, struct.pack("<49152I", *range(0, 0x30000, 4)), 0)
    _mem = GuestMemory.from_regions([(LOW, _ram), (HIGH, _ram)])


class Bad(Exception):
    """The reference walk rejects the chain."""


def _offset(gpa: int, length: int) -> int:
    for r in (LOW, HIGH):
        if r.guest_phys_addr <= gpa and gpa + length <= r.gpa_end:
            return gpa - r.guest_phys_addr + r.mmap_offset
    raise Bad(f"[{gpa:#x}, +{length:#x}) outside guest memory")


def _entries(gpa: int, count: int) -> list[tuple[int, int, int, int]]:
    data = os.pread(_ram, 16 * count, _offset(gpa, 16 * count))
    return list(DESC.iter_unpack(data))


def reference(queue_size: int, head: int) -> list[tuple[int, int, bool]]:
    """(gpa, len, writable) of every buffer, or Bad: the spec's rules, one at a time."""
    if head >= queue_size:
        raise Bad("head beyond the queue")
    table = _entries(0, queue_size)
    out: list[tuple[int, int, bool]] = []
    indirect = False
    index, hops = head, queue_size
    while True:
        if hops == 0:
            raise Bad("more hops than descriptors")
        hops -= 1
        addr, length, flags, nxt = table[index]
        if flags & INDIRECT:
            if indirect:
                raise Bad("nested indirect")
            if flags & NEXT or not length or length % 16 or length > 16 * 65536:
                raise Bad("bad indirect descriptor")
            table = _entries(addr, length // 16)
            indirect = True
            index, hops = 0, length // 16
            continue
        _offset(addr, length)
        writable = bool(flags & WRITE)
        if not writable and out and out[-1][2]:
            raise Bad("readable after writable")
        out.append((addr, length, writable))
        if sum(n for _a, n, _w in out) >= 1 << 32:
            raise Bad("chain longer than 4 GiB")
        if not flags & NEXT:
            return out
        index = nxt
        if index >= len(table):
            raise Bad("next beyond the table")


def _bytes(buffers: list[tuple[int, int, bool]], writable: bool) -> bytes:
    return b"".join(os.pread(_ram, n, _offset(a, n)) for a, n, w in buffers if w == writable)


def one_input(data: bytes) -> None:
    assert _mem is not None
    r = Reader(data)
    size = 1 << (r.u8() % 9)
    head = r.u16() % (2 * size)
    nbytes = r.u16()
    image = r.rest()[:0x10000]
    os.pwrite(_ram, _PATTERN, 0)
    os.pwrite(_ram, image, 0)
    try:
        want: list[tuple[int, int, bool]] | None = reference(size, head)
    except Bad:
        want = None
    try:
        chain = read_chain(_mem, 0, size, head)
    except ChainError as e:
        if want is not None:
            raise Broken(f"read_chain: {e}; the reference walks {want}") from e
        chain = None
    if chain is not None:
        if want is None:
            raise Broken("read_chain accepted a chain the reference rejects")
        lengths = (sum(n for _a, n, w in want if not w), sum(n for _a, n, w in want if w))
        if (chain.readable_len, chain.writable_len) != lengths or lengths != (
                sum(map(len, chain.readable)), sum(map(len, chain.writable))):
            raise Broken(f"read_chain's lengths differ from the reference's {want}")
        if sum(lengths) <= _COMPARE_MAX:  # copying GiBs would only measure memcpy
            readable = b"".join(chain.readable)
            if (readable, b"".join(chain.writable)) != (_bytes(want, False), _bytes(want, True)):
                raise Broken(f"read_chain's buffers differ from the reference's {want}")
            if peek_chain(_mem, 0, size, head, nbytes) != readable[:nbytes]:
                raise Broken(f"peek_chain({nbytes}) is not the readable part's prefix")
    found = peek_buffers(_mem, _mem.view(0, 16 * size), head)
    if found is not None and want is not None:
        readable_bufs = [(a, n) for a, n, w in want if not w]
        second_ok = found[2:] == (0, 0) or (len(readable_bufs) > 1
                                             and found[2:] == readable_bufs[1])
        if not readable_bufs or found[:2] != readable_bufs[0] or not second_ok:
            raise Broken(f"peek_buffers {found}, the chain's readable buffers {readable_bufs}")


# -- seeds --------------------------------------------------------------------------------------
def _table(entries: list[tuple[int, int, int]]) -> bytes:
    """Linux's indirect layout: entry i links to i + 1."""
    last = len(entries) - 1
    return b"".join(DESC.pack(a, n, f | (NEXT if i < last else 0), i + 1 if i < last else 0)
                    for i, (a, n, f) in enumerate(entries))


def _seed(size: int, head: int, nbytes: int, ring: dict[int, tuple[int, int, int, int]],
          tables: dict[int, bytes]) -> bytes:
    image = bytearray(_PATTERN[:max([16 * size, *(g + len(t) for g, t in tables.items())])])
    for i, entry in ring.items():
        DESC.pack_into(image, 16 * i, *entry)
    for gpa, table in tables.items():
        image[gpa:gpa + len(table)] = table
    return Writer().u8(size.bit_length() - 1).u16(head).u16(nbytes).raw(image).getvalue()


def seeds() -> Iterator[bytes]:
    hi = HIGH.guest_phys_addr
    linux = {  # PROTOCOLS.md C.2, as one indirect table each
        "init": [(hi, 40, 0), (hi + 64, 64, 0), (hi + 256, 16, WRITE), (hi + 272, 64, WRITE)],
        "getattr": [(hi, 40, 0), (hi + 40, 16, 0), (hi + 64, 16, WRITE),
                    (hi + 80, 104, WRITE)],
        "write": [(hi, 40, 0), (hi + 40, 40, 0), *((hi + 4096 * (i + 1), 4096, 0)
                                                     for i in range(8)),
                  (0x9000, 16, WRITE), (0x9010, 8, WRITE)],
        "read": [(hi, 40, 0), (hi + 40, 40, 0), (0x9000, 16, WRITE),
                 *((hi + 4096 * (i + 1), 4096, WRITE) for i in range(12))],
        "read_scattered": [(hi, 40, 0), (hi + 40, 40, 0), (0x9000, 16, WRITE),
                           *((hi + 8192 * i + 4096, 2048, WRITE) for i in range(6)),
                           (0x4000, 512, WRITE)],
    }
    for entries in linux.values():
        table = _table(entries)
        yield _seed(16, 3, 48, {3: (0x800, len(table), INDIRECT, 0)}, {0x800: table})
    # GETATTR as a plain chain (no INDIRECT_DESC), linked out of order; a FORGET on hiprio.
    yield _seed(8, 5, 40, {5: (hi, 40, NEXT, 2), 2: (hi + 40, 16, NEXT, 7),
                           7: (hi + 64, 16, WRITE | NEXT, 0), 0: (hi + 80, 104, WRITE, 0)}, {})
    yield _seed(128, 0, 48, {0: (hi, 48, 0, 0)}, {})
    # Direct buffers, then an indirect descriptor (legal); then faults, one per seed.
    tail = _table([(hi + 64, 16, WRITE), (hi + 80, 64, WRITE)])
    yield _seed(16, 1, 64, {1: (hi, 40, NEXT, 2), 2: (0x800, len(tail), INDIRECT, 0)},
                {0x800: tail})
    yield _seed(4, 0, 64, {0: (hi, 40, NEXT, 1), 1: (hi + 40, 8, NEXT, 0)}, {})  # loop
    loop = bytearray(_table([(hi, 40, 0)] * 9))
    DESC.pack_into(loop, 16 * 8, hi, 40, NEXT, 3)
    yield _seed(16, 0, 48, {0: (0x800, len(loop), INDIRECT, 0)}, {0x800: bytes(loop)})
    nested = _table([(hi, 40, 0), (0xA00, 32, INDIRECT)])
    yield _seed(16, 0, 48, {0: (0x800, 32, INDIRECT, 0)}, {0x800: nested, 0xA00: nested})
    backwards = _table([(hi, 40, 0), (hi + 64, 16, WRITE), (hi + 40, 16, 0)])
    yield _seed(16, 0, 48, {0: (0x800, len(backwards), INDIRECT, 0)}, {0x800: backwards})
    yield _seed(16, 0, 48, {0: (0xFFF0, 40, 0, 0)}, {})  # runs into the hole
    yield _seed(16, 0, 48, {0: (0x800, 24, INDIRECT, 0)}, {0x800: _table([(hi, 40, 0)] * 2)})
    yield _seed(16, 0, 48, {0: (0x800, 16, INDIRECT | NEXT, 1)}, {0x800: _table([(hi, 40, 0)])})
