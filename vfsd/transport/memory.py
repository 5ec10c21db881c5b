"""Guest memory: the mapped regions of the vhost-user memory table, bounds-checked views.

Every region is an fd from the front-end (a memfd for QEMU's `memory-backend-memfd`). We map
`mmap_offset + memory_size` bytes from offset 0 (libvhost-user's portable way: Python's mmap
offset must be allocation-granularity aligned, hugepage fds need hugepage alignment) and use
`base + mmap_offset`. A dup of each fd is kept so the supervisor can hand the same memory to
workers (`regions()`), which rebuild it with `GuestMemory.from_regions`.

Two address spaces (PROTOCOLS.md A.7): descriptor addresses are guest-physical (`view`), ring
addresses in SET_VRING_ADDR are QEMU virtual addresses (`va_to_gpa`).

Unmapping: a view handed out keeps its mapping alive. Removing a region while such views exist
drops our references instead of forcing `munmap` (which Python refuses with `BufferError`);
CPython unmaps when the last view dies, so a stale view can never fault.
"""

from __future__ import annotations

import mmap
import os
import struct
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vfsd.transport import GuestMemoryError

_U64_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One memory-table entry (vhost-user `VhostUserMemoryRegion`)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def check(self) -> None:
        """Reject regions that cannot be mapped or overflow u64 (front-end error)."""
        for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
            value = getattr(self, name)
            if not 0 <= value <= _U64_MAX:
                raise GuestMemoryError(f"region {name}={value:#x} is not a u64")
        if self.memory_size == 0:
            raise GuestMemoryError("region of size 0")
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            if getattr(self, name) + self.memory_size - 1 > _U64_MAX:
                raise GuestMemoryError(f"region {name} + size overflows u64: {self}")

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.memory_size


class _Mapping:
    """A mapped region: the mmap, a view of exactly the region, and our dup of the fd."""

    __slots__ = ("end", "fd", "gpa", "mm", "region", "size", "view")

    def __init__(self, region: MemRegion, fd: int) -> None:
        region.check()
        length = region.mmap_offset + region.memory_size
        try:
            mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except (OSError, ValueError, OverflowError) as e:
            # ValueError: fd smaller than the region (mapping it would SIGBUS on access).
            raise GuestMemoryError(f"cannot map region {region}: {e}") from e
        self.region = region
        self.gpa = region.guest_phys_addr
        self.size = region.memory_size
        self.end = self.gpa + self.size
        self.mm = mm
        self.view = memoryview(mm)[region.mmap_offset : length]
        self.fd = os.dup(fd)

    def close(self) -> None:
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # views still exported: unmapped when the last one is garbage-collected
        os.close(self.fd)


class GuestMemory:
    """The set of mapped regions; `view(gpa, length)` is the only way to touch guest RAM.

    Region fds passed in stay owned by the caller (we map them and keep a dup).
    Not thread-safe for concurrent table changes; views can be used from any thread.
    """

    def __init__(self) -> None:
        self._maps: list[_Mapping] = []  # sorted by gpa, non-overlapping
        self._starts: list[int] = []
        # Last region hit: most chains live in one region, so `view` is two compares + a slice.
        self._hit_gpa = -1
        self._hit_size = 0
        self._hit_view = memoryview(bytearray())

    @classmethod
    def from_regions(cls, regions: Iterable[tuple[MemRegion, int]]) -> GuestMemory:
        """Build a table (e.g. in a worker) from `regions()` of another process."""
        mem = cls()
        mem.set_regions(regions)
        return mem

    # -- hot path ------------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """Writable view of `[gpa, gpa+length)`; raises GuestMemoryError unless it lies inside
        one region. `length` 0 is allowed (gpa must still be inside or at the end of a region)."""
        off = gpa - self._hit_gpa
        if off >= 0 and length >= 0 and off + length <= self._hit_size:
            return self._hit_view[off : off + length]
        return self._view_slow(gpa, length)

    def unpack(self, st: struct.Struct, gpa: int) -> tuple[Any, ...]:
        """`st.unpack_from` guest memory at `gpa` (bounds-checked like `view`), without
        creating a view: for the few fields the supervisor reads per request."""
        off = gpa - self._hit_gpa
        if off >= 0 and off + st.size <= self._hit_size:
            return st.unpack_from(self._hit_view, off)
        return st.unpack_from(self._view_slow(gpa, st.size))

    def hit_window(self) -> tuple[int, int, memoryview]:
        """(gpa, size, view) of the region the last `view()` hit, for loops that inline the
        fast path (the chain walker)."""
        return self._hit_gpa, self._hit_size, self._hit_view

    def _view_slow(self, gpa: int, length: int) -> memoryview:
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            m = self._maps[i]
            off = gpa - m.gpa
            if off + length <= m.size:
                self._hit_gpa, self._hit_size, self._hit_view = m.gpa, m.size, m.view
                return m.view[off : off + length]
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) not in guest memory")

    # -- translation ---------------------------------------------------------------------------
    def va_to_gpa(self, va: int) -> int:
        """Translate a front-end (QEMU) virtual address, as in SET_VRING_ADDR, to a GPA."""
        for m in self._maps:
            r = m.region
            if r.userspace_addr <= va < r.userspace_addr + r.memory_size:
                return va - r.userspace_addr + r.guest_phys_addr
        raise GuestMemoryError(f"front-end address {va:#x} not in any memory region")

    # -- table changes -------------------------------------------------------------------------
    def add_region(self, region: MemRegion, fd: int) -> None:
        """ADD_MEM_REG: map one more region (must not overlap another in GPA space)."""
        m = _Mapping(region, fd)
        try:
            self._insert(m)
        except GuestMemoryError:
            m.close()
            raise

    def remove_region(self, region: MemRegion) -> MemRegion:
        """REM_MEM_REG: unmap the region matching gpa + userspace_addr + size (mmap_offset is
        ignored, as in the spec). Returns the removed region."""
        for i, m in enumerate(self._maps):
            r = m.region
            if (r.guest_phys_addr, r.userspace_addr, r.memory_size) == (
                    region.guest_phys_addr, region.userspace_addr, region.memory_size):
                del self._maps[i]
                del self._starts[i]
                self._forget_hit()
                m.close()
                return r
        raise GuestMemoryError(f"no memory region matches {region}")

    def set_regions(self, regions: Iterable[tuple[MemRegion, int]]) -> None:
        """SET_MEM_TABLE: replace the whole table. All-or-nothing: on error the old table stays."""
        new = GuestMemory()
        try:
            for region, fd in regions:
                new.add_region(region, fd)
        except GuestMemoryError:
            new.close()
            raise
        old = self._maps
        self._maps, self._starts = new._maps, new._starts
        new._maps, new._starts = [], []
        self._forget_hit()
        for m in old:
            m.close()

    def _insert(self, m: _Mapping) -> None:
        i = bisect_right(self._starts, m.gpa)
        if (i > 0 and self._maps[i - 1].end > m.gpa) or (
                i < len(self._maps) and self._maps[i].gpa < m.end):
            raise GuestMemoryError(f"region {m.region} overlaps an existing region")
        self._maps.insert(i, m)
        self._starts.insert(i, m.gpa)

    def _forget_hit(self) -> None:
        self._hit_gpa, self._hit_size, self._hit_view = -1, 0, memoryview(bytearray())

    # -- inspection ----------------------------------------------------------------------------
    def regions(self) -> list[tuple[MemRegion, int]]:
        """Regions in GPA order with our fd for each (still owned by us: dup before keeping)."""
        return [(m.region, m.fd) for m in self._maps]

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        """Unmap everything and close our fd dups."""
        maps, self._maps, self._starts = self._maps, [], []
        self._forget_hit()
        for m in maps:
            m.close()
