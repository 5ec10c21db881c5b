"""Guest memory (`GuestMemory`: memory-table changes, `view`, `unpack`, `va_to_gpa`) and ring
placement (`Vring.set_size`/`set_addresses`/`remap`), checked against a plain model.

Input: operations until the input ends, each `u8 op` then its arguments (regions are four
u64: guest_phys_addr, memory_size, userspace_addr, mmap_offset; every region is backed by one
1 MiB memfd). Documented errors: `GuestMemoryError`, `VringError`. Invariants: every table
change succeeds exactly when the model says the region is mappable and overlaps nothing (and
`set_regions` is all-or-nothing), `regions()` is the model's table, a view or unpack succeeds
exactly for ranges inside one region and aliases the right file bytes (read and write), VA
translation picks the model's region, and a placed ring's views are the model's bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import astuple

from tests.fuzz.harness import Broken, Reader, Writer, open_fds
from vfsd.transport import GuestMemoryError, VringError
from vfsd.transport.abi import DESC, avail_ring_size, desc_table_size, used_ring_size
from vfsd.transport.memory import GuestMemory, MemRegion
from vfsd.transport.virtqueue import Vring

MAX_LEN = 2048
RAM_SIZE = 1 << 20
_U64_MAX = (1 << 64) - 1
ADD, REMOVE, SET, VIEW, UNPACK, VA, RING = range(7)


class Model:
    """What the table should be: regions by GPA."""

    def __init__(self) -> None:
        self.regions: list[MemRegion] = []

    @staticmethod
    def mappable(r: MemRegion) -> bool:
        return (r.memory_size > 0 and r.mmap_offset + r.memory_size <= RAM_SIZE
                and all(v + r.memory_size - 1 <= _U64_MAX
                        for v in (r.guest_phys_addr, r.userspace_addr, r.mmap_offset)))

    @staticmethod
    def fits(table: list[MemRegion], r: MemRegion) -> bool:
        return Model.mappable(r) and not any(
            o.guest_phys_addr < r.gpa_end and r.guest_phys_addr < o.gpa_end for o in table)

    def offset(self, gpa: int, length: int) -> int | None:
        """File offset of [gpa, gpa+length) if it lies in one region."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa and gpa + length <= r.gpa_end:
                return gpa - r.guest_phys_addr + r.mmap_offset
        return None

    def va_to_gpa(self, va: int) -> int | None:
        for r in sorted(self.regions, key=lambda r: r.guest_phys_addr):
            if r.userspace_addr <= va < r.userspace_addr + r.memory_size:
                return va - r.userspace_addr + r.guest_phys_addr
        return None


def _region(r: Reader) -> MemRegion:
    return MemRegion(r.u64(), r.u64(), r.u64(), r.u64())


def _expect(ok: bool, what: str, fn, *args):  # type: ignore[no-untyped-def]
    """Run `fn`; it must succeed iff `ok` (failing with GuestMemoryError)."""
    try:
        result = fn(*args)
    except GuestMemoryError as e:
        if ok:
            raise Broken(f"{what} failed: {e}") from e
        return None
    if not ok:
        raise Broken(f"{what} succeeded, the model says it must fail")
    return result


def _check_view(mem: GuestMemory, model: Model, ram: int, gpa: int, length: int) -> None:
    off = model.offset(gpa, length)
    view = _expect(off is not None, f"view({gpa:#x}, {length})", mem.view, gpa, length)
    if view is None or off is None:
        return
    if len(view) != length or bytes(view) != os.pread(ram, length, off):
        raise Broken(f"view({gpa:#x}, {length}) does not alias file offset {off:#x}")
    if length:
        pattern = bytes((gpa + i) & 0xFF for i in range(min(length, 64)))
        view[:len(pattern)] = pattern
        if os.pread(ram, len(pattern), off) != pattern:
            raise Broken(f"a write through view({gpa:#x}) missed file offset {off:#x}")


def _check_ring(vring: Vring, mem: GuestMemory, model: Model, ram: int) -> None:
    size = vring.size
    parts = ((vring.desc_gpa, desc_table_size(size)), (vring.avail_gpa, avail_ring_size(size)),
             (vring.used_gpa, used_ring_size(size)))
    offsets = [model.offset(gpa, n) for gpa, n in parts]
    inside = None not in offsets
    if vring.remap(mem) != inside or vring.mapped != inside:
        raise Broken(f"ring {parts}: remap says {vring.mapped}, the model {inside}")
    if inside and vring.desc_table is not None:
        want = os.pread(ram, desc_table_size(size), offsets[0])  # type: ignore[arg-type]
        if bytes(vring.desc_table) != want:
            raise Broken("the ring's descriptor table view is not the model's bytes")


def _ring(r: Reader, mem: GuestMemory, model: Model, ram: int) -> Vring | None:
    vring = Vring(0)
    try:
        vring.set_size(1 << (r.u8() % 12))
    except VringError:
        return None  # 2048 is above the 1024 limit
    vas = [r.u64() for _ in range(3)]
    gpas = [model.va_to_gpa(va) for va in vas]
    try:
        translated = [mem.va_to_gpa(va) for va in vas]
    except GuestMemoryError:
        if None not in gpas:
            raise Broken(f"va_to_gpa failed for {vas}, model {gpas}") from None
        return None
    if translated != gpas:
        raise Broken(f"va_to_gpa({vas}) = {translated}, model {gpas}")
    try:
        vring.set_addresses(mem, *translated)
    except VringError:
        return None
    _check_ring(vring, mem, model, ram)
    return vring


def one_input(data: bytes) -> None:
    before = open_fds()
    ram = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, RAM_SIZE)
    mem = GuestMemory()
    model = Model()
    vring: Vring | None = None
    r = Reader(data)
    try:
        while r.left:
            op = r.u8() % 7
            if op == ADD:
                region = _region(r)
                ok = model.fits(model.regions, region)
                _expect(ok, f"add {region}", mem.add_region, region, ram)
                if ok:
                    model.regions.append(region)
            elif op == REMOVE:
                region = _region(r)
                match = next((o for o in model.regions if (
                    o.guest_phys_addr, o.userspace_addr, o.memory_size) == (
                    region.guest_phys_addr, region.userspace_addr, region.memory_size)), None)
                if _expect(match is not None, f"remove {region}", mem.remove_region,
                           region) != match:
                    raise Broken(f"remove {region} took another region than {match}")
                if match is not None:
                    model.regions.remove(match)
            elif op == SET:
                table: list[MemRegion] = []
                ok = True
                for _ in range(r.u8() % 5):
                    region = _region(r)
                    ok = ok and model.fits(table, region)
                    table.append(region)
                _expect(ok, f"set {table}", mem.set_regions, [(t, ram) for t in table])
                if ok:
                    model.regions = table
            elif op == VIEW:
                _check_view(mem, model, ram, r.u64(), r.u16())
            elif op == UNPACK:
                gpa = r.u64()
                off = model.offset(gpa, DESC.size)
                got = _expect(off is not None, f"unpack({gpa:#x})", mem.unpack, DESC, gpa)
                if off is not None and got != DESC.unpack(os.pread(ram, DESC.size, off)):
                    raise Broken(f"unpack({gpa:#x}) = {got}, not the bytes at {off:#x}")
            elif op == VA:
                va = r.u64()
                want = model.va_to_gpa(va)
                if _expect(want is not None, f"va_to_gpa({va:#x})", mem.va_to_gpa, va) != want:
                    raise Broken(f"va_to_gpa({va:#x}) is not the model's {want}")
            else:
                vring = _ring(r, mem, model, ram)
            got_table = [region for region, _fd in mem.regions()]
            if got_table != sorted(model.regions, key=astuple):
                raise Broken(f"table {got_table}, model {model.regions}")
            if vring is not None and op in (ADD, REMOVE, SET):
                _check_ring(vring, mem, model, ram)
    finally:
        if vring is not None:
            vring.close()
        mem.close()
        os.close(ram)
    if leaked := open_fds() - before:
        raise Broken(f"fds left open after close(): {sorted(leaked)}")


def _w_region(w: Writer, gpa: int, size: int, va: int, off: int) -> Writer:
    return w.u64(gpa).u64(size).u64(va).u64(off)


def seeds() -> Iterator[bytes]:
    va = 0x7F3A_0000_0000
    # The pc layout QEMU sends (A.6): [0, 640K) and [0xC0000, end), mmap_offset == gpa.
    pc = Writer().u8(ADD)
    _w_region(pc, 0, 0xA0000, va, 0).u8(ADD)
    _w_region(pc, 0xC0000, RAM_SIZE - 0xC0000, va + 0xC0000, 0xC0000)
    pc.u8(VIEW).u64(0x9FFF0).u16(16).u8(VIEW).u64(0x9FFF0).u16(32)
    pc.u8(UNPACK).u64(0xC0000).u8(VA).u64(va + 0xC0010).u8(VA).u64(va + 0xA0000)
    pc.u8(RING).u8(4).u64(va + 0xC0000).u64(va + 0xC1000).u64(va + 0xC2000)
    pc.u8(REMOVE)
    _w_region(pc, 0xC0000, RAM_SIZE - 0xC0000, va + 0xC0000, 0)
    pc.u8(ADD)
    _w_region(pc, 0xC0000, RAM_SIZE - 0xC0000, va + 0xC0000, 0xC0000)
    yield pc.getvalue()
    table = Writer().u8(SET).u8(2)
    _w_region(table, 0x1000_0000, 0x10000, 0x5000_0000, 0x10000)
    _w_region(table, 0x2000_0000, 0x10000, 0x6000_0000, 0)
    table.u8(VIEW).u64(0x1000_FFF8).u16(8).u8(RING).u8(0).u64(0x6000_0000).u64(0x6000_0100)
    table.u64(0x6000_0200).u8(SET).u8(0)
    yield table.getvalue()
    bad = Writer().u8(ADD)
    _w_region(bad, _U64_MAX - 0xFFF, 0x2000, 0, 0).u8(ADD)
    _w_region(bad, 0, RAM_SIZE, 0, 1)
    yield bad.getvalue()
