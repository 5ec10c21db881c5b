"""Split virtqueue, device side: bounded chain walking (workers) and ring operations (supervisor).

Layout and rules: PROTOCOLS.md B.1-B.3; bounds after rust-vmm `virtio-queue` `chain.rs` and
`queue.rs`; notification and EVENT_IDX bookkeeping after libvhost-user `vring_notify`.

Shared-memory discipline (trap 23): every field the guest reads concurrently (`used.idx`,
`avail_event`) is written with ONE aligned store through `memoryview.cast('H')`, never with
`struct.pack_into` (which zero-fills first). Used elements are one 8-byte store each and are
published by the later `used.idx` store. x86-64 reorders only store->load, so acquire/release
ordering is free and the two store->load points of B.3 (steps 4 and 5) go through `full_fence`.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from functools import lru_cache
from itertools import compress
from operator import add, ne

from vfsd.fence import full_fence
from vfsd.transport import (
    ChainError,
    ChainFault,
    GuestMemoryError,
    GuestProtocolError,
    VringError,
)
from vfsd.transport.abi import (
    AVAIL_ALIGN,
    DESC,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from vfsd.transport.memory import GuestMemory

__all__ = [
    "ChainError",
    "ChainFault",
    "DescChain",
    "GuestProtocolError",  # re-exported: what the supervisor and workers catch
    "Vring",
    "VringError",
    "VringLayout",
    "full_fence",
    "peek_buffers",
    "peek_chain",
    "read_chain",
    "vring_need_event",
]

_U32_MAX = 0xFFFFFFFF
_MAX_INDIRECT_LEN = 65536 * DESC.size  # `next` is a u16, so no table can use more entries
_NO_LIMIT = 1 << 64
# Whole walks of tables with this many entries take the vectorised path (shorter: the loop is
# cheaper; longer: not Linux's, and not worth a cached Struct per size).
_LINEAR_MIN, _LINEAR_MAX = 8, 1024
_NEXT_SEQ = tuple(range(1, 65536))  # `next` fields of a table laid out in order
_DESC_PAIR = struct.Struct("<QIHHQIHH")  # two table entries at once (the peek fast path)
_PEEK_STOP = VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE  # buffers peek_buffers leaves
_R, _W = VRING_DESC_F_NEXT, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE  # flags of a linked entry

def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio `vring_need_event`: did the index cross `event_idx` moving from old to new?
    All u16 arithmetic: `(new - event - 1) mod 2^16 < (new - old) mod 2^16`."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# -- chains (worker side; the supervisor peeks) ------------------------------------------------
@dataclass(slots=True)
class DescChain:
    """A walked chain: views of the device-readable then device-writable buffers.

    Not frozen: built once per request on the hot path. Views point into guest memory, which
    the guest may change at any moment: copy what you validate (trap 4).
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    readable_len: int
    writable_len: int


def _walk(mem: GuestMemory, desc_gpa: int, queue_size: int, head: int, stop_after: int
          ) -> tuple[list[memoryview], list[memoryview], int, int]:
    """Walk one chain with rust-vmm's bounds; stop early once `stop_after` readable bytes are
    collected (peek). Returns (readable, writable, readable_len, writable_len)."""
    if not 0 <= head < queue_size:
        raise ChainError(ChainFault.BAD_INDEX, f"head {head}, queue size {queue_size}")
    view = mem.view
    unpack = DESC.unpack_from
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    readable_len = writable_len = 0
    try:
        table = view(desc_gpa, queue_size << 4)
        table_size = ttl = queue_size  # hops left: a loop can never outlive the table
        index = head
        while True:
            if ttl == 0:
                raise ChainError(ChainFault.TOO_MANY_DESCRIPTORS,
                                 f"head {head}: > {table_size} descriptors")
            ttl -= 1
            addr, length, flags, nxt = unpack(table, index << 4)
            if flags & VRING_DESC_F_INDIRECT:
                # INDIRECT+NEXT illegal; the WRITE flag here is ignored (spec); one level only
                # (enforced in _walk_table).
                if flags & VRING_DESC_F_NEXT:
                    raise ChainError(ChainFault.INDIRECT_WITH_NEXT, f"head {head}")
                if length == 0 or length & 15 or length > _MAX_INDIRECT_LEN:
                    raise ChainError(ChainFault.BAD_INDIRECT_TABLE, f"head {head}: len {length}")
                table_size = length >> 4
                return _walk_table(mem, view(addr, length), table_size, head, stop_after,
                                   readable, writable, readable_len, writable_len)
            buf = view(addr, length)
            if flags & VRING_DESC_F_WRITE:
                writable.append(buf)
                writable_len += length
            else:
                if writable:
                    raise ChainError(ChainFault.READABLE_AFTER_WRITABLE, f"head {head}")
                readable.append(buf)
                readable_len += length
                if readable_len >= stop_after:
                    break
            if readable_len + writable_len > _U32_MAX:
                raise ChainError(ChainFault.TOO_LONG, f"head {head}")
            if not flags & VRING_DESC_F_NEXT:
                break
            index = nxt
            if index >= table_size:
                raise ChainError(ChainFault.BAD_INDEX, f"head {head}: next {index} >= "
                                 f"{table_size}")
    except GuestMemoryError as e:
        raise ChainError(ChainFault.BAD_ADDRESS, f"head {head}: {e}") from e
    return readable, writable, readable_len, writable_len


@lru_cache(maxsize=64)
def _table_struct(entries: int) -> struct.Struct:
    return struct.Struct("<" + "QIHH" * entries)


def _walk_linear(mem: GuestMemory, table_view: memoryview, table_size: int
                 ) -> tuple[list[memoryview], list[memoryview], int, int] | None:
    """Linux's layout of an indirect table, checked and mapped with C-level tuple operations
    instead of a Python step per descriptor: entry i links to i + 1, readable entries come
    before writable ones, no INDIRECT flag. Runs of buffers that are adjacent in guest memory
    become one view, so a 1 MiB READ into contiguous pages is one `preadv` iovec. None when
    the table is anything else: the general walk then decides (and reports what is wrong)."""
    flat = _table_struct(table_size).unpack_from(table_view)
    last = table_size - 1
    if flat[3:-4:4] != _NEXT_SEQ[:last]:
        return None
    flags = flat[2::4]
    tail = flags[last]
    if tail == 0:  # readable only
        if flags.count(_R) != last:
            return None
        split = table_size
    elif tail == VRING_DESC_F_WRITE:
        split = flags.count(_R)
        if flags[:split].count(_R) != split or flags.count(_W) != last - split:
            return None
    else:
        return None
    addrs = flat[0::4]
    lens = flat[1::4]
    total = sum(lens)
    if total > _U32_MAX:
        return None
    ends = tuple(map(add, addrs, lens))
    view = mem.view

    def views(a: int, b: int) -> list[memoryview]:
        # Indices where a new run starts (the buffer does not continue the previous one).
        starts = list(compress(range(a + 1, b), map(ne, ends[a : b - 1], addrs[a + 1 : b])))
        if not starts:
            return [view(addrs[a], ends[b - 1] - addrs[a])]
        if len(starts) < b - a - 1:
            stops = [*starts, b]
            starts.insert(0, a)
            return [view(addrs[i], ends[j - 1] - addrs[i])
                    for i, j in zip(starts, stops, strict=True)]
        # No two buffers adjacent: slice one view of their span when it is in one region.
        low = min(addrs[a:b])
        try:
            span = view(low, max(ends[a:b]) - low)
        except GuestMemoryError:
            return [view(x, n) for x, n in zip(addrs[a:b], lens[a:b], strict=True)]
        return [span[x - low : y - low] for x, y in zip(addrs[a:b], ends[a:b], strict=True)]

    readable_len = sum(lens[:split])
    try:
        readable = views(0, split) if split else []
        writable = views(split, table_size) if split < table_size else []
    except GuestMemoryError:
        return None  # the general walk names the bad buffer
    return readable, writable, readable_len, total - readable_len


def _walk_table(mem: GuestMemory, table_view: memoryview, table_size: int, head: int,
                stop_after: int, readable: list[memoryview], writable: list[memoryview],
                readable_len: int, writable_len: int
                ) -> tuple[list[memoryview], list[memoryview], int, int]:
    """The rest of a chain inside an indirect table — where Linux puts every multi-buffer
    request, so a 1 MiB READ's 258 descriptors go through here. Same bounds as `_walk`. A
    whole walk of a long table in Linux's layout goes through `_walk_linear`; otherwise the
    table is unpacked in one C call (a peek reads only the entries it needs) and the
    guest-memory fast path is inlined."""
    if (stop_after == _NO_LIMIT and _LINEAR_MIN <= table_size <= _LINEAR_MAX
            and not readable and not writable):
        linear = _walk_linear(mem, table_view, table_size)
        if linear is not None:
            return linear
    # A whole walk takes a snapshot (the guest may rewrite the table while we walk it); a
    # peek unpacks just the entries it reads.
    snapshot = list(DESC.iter_unpack(table_view)) if stop_after == _NO_LIMIT else None
    unpack = DESC.unpack_from
    view = mem.view
    hit_gpa, hit_size, hit_view = mem.hit_window()
    index = 0
    for _ in range(table_size):  # ttl: a loop can never outlive the table
        addr, length, flags, nxt = (snapshot[index] if snapshot is not None
                                    else unpack(table_view, index << 4))
        if flags & VRING_DESC_F_INDIRECT:
            raise ChainError(ChainFault.NESTED_INDIRECT, f"head {head}")
        off = addr - hit_gpa
        if off >= 0 and off + length <= hit_size:
            buf = hit_view[off : off + length]
        else:
            try:
                buf = view(addr, length)
            except GuestMemoryError as e:
                raise ChainError(ChainFault.BAD_ADDRESS, f"head {head}: {e}") from e
            hit_gpa, hit_size, hit_view = mem.hit_window()
        if flags & VRING_DESC_F_WRITE:
            writable.append(buf)
            writable_len += length
        else:
            if writable:
                raise ChainError(ChainFault.READABLE_AFTER_WRITABLE, f"head {head}")
            readable.append(buf)
            readable_len += length
            if readable_len >= stop_after:
                return readable, writable, readable_len, writable_len
        if readable_len + writable_len > _U32_MAX:
            raise ChainError(ChainFault.TOO_LONG, f"head {head}")
        if not flags & VRING_DESC_F_NEXT:
            return readable, writable, readable_len, writable_len
        index = nxt
        if index >= table_size:
            raise ChainError(ChainFault.BAD_INDEX,
                             f"head {head}: next {index} >= {table_size} (indirect)")
    raise ChainError(ChainFault.TOO_MANY_DESCRIPTORS, f"head {head}: > {table_size} descriptors")


def read_chain(mem: GuestMemory, desc_gpa: int, queue_size: int, head: int) -> DescChain:
    """Walk the chain at `head` (direct and indirect descriptors) into readable and writable
    views. Raises ChainError for any malformed chain or address outside guest memory."""
    readable, writable, rlen, wlen = _walk(mem, desc_gpa, queue_size, head, _NO_LIMIT)
    return DescChain(head, readable, writable, rlen, wlen)


def peek_chain(mem: GuestMemory, desc_gpa: int, queue_size: int, head: int, nbytes: int
               ) -> bytes:
    """Copy of the first `nbytes` of the chain's readable part (fewer if it is shorter).
    Walks only as far as needed, with the same bounds as `read_chain`."""
    readable, _w, _rl, _wl = _walk(mem, desc_gpa, queue_size, head, nbytes)
    out = bytearray()
    for buf in readable:
        need = nbytes - len(out)
        if need <= 0:
            break
        out += buf[:need]
    return bytes(out)


def peek_buffers(mem: GuestMemory, desc_table: memoryview, head: int
                 ) -> tuple[int, int, int, int] | None:
    """The supervisor's per-request look, for the layouts Linux uses: the chain's first one
    or two readable buffers (a request's header and its arguments), either in the indirect
    table `head` points to, or in the ring itself (a FORGET is one direct buffer). Returns
    (gpa, len) of the first and of the second buffer ((0, 0) unless the first links to a
    readable one), or None for any other shape or a table outside guest memory:
    `peek_chain` then does the checked walk. Nothing is mapped or copied: the caller reads
    the fields it needs with `GuestMemory.unpack`, which bounds-checks each read."""
    a1 = l1 = f1 = 0
    linked = False  # the first buffer's `next` names the second one
    try:
        a0, l0, f0, n0 = DESC.unpack_from(desc_table, head << 4)
        if f0 & VRING_DESC_F_INDIRECT:
            if f0 & VRING_DESC_F_NEXT or l0 & 15 or not l0:
                return None
            if l0 >= 32:
                a0, l0, f0, n0, a1, l1, f1, _ = mem.unpack(_DESC_PAIR, a0)
                linked = n0 == 1
            else:
                a0, l0, f0, _ = mem.unpack(DESC, a0)  # a one-entry table ends there
        elif f0 & VRING_DESC_F_NEXT:
            a1, l1, f1, _ = DESC.unpack_from(desc_table, n0 << 4)
            linked = True
        if f0 & _PEEK_STOP:
            return None
        if f0 & VRING_DESC_F_NEXT and linked and not f1 & _PEEK_STOP:
            return a0, l0, a1, l1
        return a0, l0, 0, 0
    except (GuestMemoryError, struct.error, IndexError):
        return None


# -- the ring (supervisor side) --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VringLayout:
    """Where a ring lives in guest-physical space (what a worker needs besides memory)."""

    index: int
    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int


class Vring:
    """One split virtqueue: vhost-user state plus the device's ring operations.

    Ring addresses are kept as GPAs (translated once from QEMU VAs at SET_VRING_ADDR), so a
    memory-table change only needs `remap(mem)` to re-derive the views. Owns its kick, call
    and err fds. Single-threaded: the supervisor loop and the backend share it.
    """

    __slots__ = (
        "_avail", "_avail_event_at", "_mask", "_used", "_used_elems", "_used_event_at",
        "avail_gpa", "call_fd", "desc_gpa", "desc_table", "enabled", "err_fd", "event_idx", "index",
        "kick_fd", "last_avail_idx", "max_size", "signalled_used", "signalled_used_valid",
        "size", "started", "used_gpa", "used_idx",
    )

    def __init__(self, index: int, max_size: int = 1024) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"max queue size {max_size} is not a power of 2 <= 32768")
        self.index = index
        self.max_size = max_size
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.size = 0  # from SET_VRING_NUM; 0 = not configured
        self.desc_gpa = self.avail_gpa = self.used_gpa = 0
        self.last_avail_idx = 0  # next avail slot to consume (SET/GET_VRING_BASE)
        self.used_idx = 0  # next used slot to fill (read from used.idx at set-addr)
        self.signalled_used = 0  # used_idx at the last notification decision (EVENT_IDX)
        self.signalled_used_valid = False
        self.event_idx = False
        self.started = False  # has a kick fd (SET_VRING_KICK) and not stopped (GET_VRING_BASE)
        self.enabled = False  # SET_VRING_ENABLE, or SET_FEATURES without bit 30
        self._unmap()

    def _unmap(self) -> None:
        self.desc_table: memoryview | None = None  # for `peek_buffers`
        self._avail: memoryview | None = None  # u16: flags, idx, ring[size], used_event
        self._used: memoryview | None = None  # u16: flags, idx, (elems), avail_event
        self._used_elems: memoryview | None = None  # u64 per used element: id | len << 32
        self._mask = 0
        self._used_event_at = 0
        self._avail_event_at = 0

    # -- configuration (backend) -------------------------------------------------------------
    def set_size(self, size: int) -> None:
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VringError(f"queue {self.index}: size {size} is not a power of 2 <= "
                             f"{self.max_size}")
        self.size = size
        self._unmap()  # the layout depends on the size: wait for SET_VRING_ADDR

    def set_base(self, avail_idx: int) -> None:
        if not 0 <= avail_idx <= 0xFFFF:
            raise VringError(f"queue {self.index}: base {avail_idx} is not a u16")
        self.last_avail_idx = avail_idx
        self.signalled_used_valid = False

    def set_addresses(self, mem: GuestMemory, desc_gpa: int, avail_gpa: int, used_gpa: int
                      ) -> None:
        """Place the ring (GPAs), map it, and take `used_idx` from `used.idx` in guest memory
        (SET_VRING_BASE carries only the avail index; libvhost-user does the same)."""
        if not self.size:
            raise VringError(f"queue {self.index}: SET_VRING_ADDR before SET_VRING_NUM")
        if desc_gpa % DESC_ALIGN or avail_gpa % AVAIL_ALIGN or used_gpa % USED_ALIGN:
            raise VringError(f"queue {self.index}: misaligned ring "
                             f"desc={desc_gpa:#x} avail={avail_gpa:#x} used={used_gpa:#x}")
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        if not self.remap(mem):
            raise VringError(f"queue {self.index}: ring outside guest memory "
                             f"desc={desc_gpa:#x} avail={avail_gpa:#x} used={used_gpa:#x}")
        assert self._used is not None
        self.used_idx = self._used[1]
        self.signalled_used_valid = False

    def remap(self, mem: GuestMemory) -> bool:
        """Re-derive the ring views after a memory-table change. False (and unmapped, so
        `ready` is False) while the ring is not inside guest memory."""
        self._unmap()
        size = self.size
        if not size or not self.used_gpa:
            return False
        try:
            desc_table = mem.view(self.desc_gpa, desc_table_size(size))
            avail = mem.view(self.avail_gpa, avail_ring_size(size))
            used = mem.view(self.used_gpa, used_ring_size(size))
        except GuestMemoryError:
            return False
        self.desc_table = desc_table
        self._avail = avail.cast("H")
        self._used = used.cast("H")
        self._used_elems = used[4 : 4 + 8 * size].cast("Q")
        self._mask = size - 1
        self._used_event_at = 2 + size  # avail ring: u16 after ring[size]
        self._avail_event_at = 2 + 4 * size  # used ring: u16 after ring[size] of 8-byte elems
        return True

    def unmap(self) -> None:
        """Drop the ring views (before a memory-table change, so old mappings can be
        unmapped at once); `remap` restores them."""
        self._unmap()

    @property
    def mapped(self) -> bool:
        return self._avail is not None

    @property
    def ready(self) -> bool:
        """Started, enabled and mapped: the device may consume and complete requests."""
        return self.started and self.enabled and self._avail is not None

    @property
    def layout(self) -> VringLayout:
        return VringLayout(self.index, self.size, self.desc_gpa, self.avail_gpa, self.used_gpa)

    def replace_kick_fd(self, fd: int | None) -> int | None:
        old, self.kick_fd = self.kick_fd, fd
        return old

    def replace_call_fd(self, fd: int | None) -> int | None:
        old, self.call_fd = self.call_fd, fd
        return old

    def replace_err_fd(self, fd: int | None) -> int | None:
        old, self.err_fd = self.err_fd, fd
        return old

    def stop(self) -> None:
        """GET_VRING_BASE: no more processing; drop kick and call (libvhost-user, rust-vmm)."""
        self.started = False
        _close(self.replace_kick_fd(None))
        _close(self.replace_call_fd(None))

    def reset(self) -> None:
        """RESET_DEVICE / RESET_OWNER: back to the initial state, every fd closed."""
        self.close()
        self._reset_state()

    def close(self) -> None:
        """Close every fd and drop the ring views (the connection is gone)."""
        self._unmap()
        _close(self.replace_kick_fd(None))
        _close(self.replace_call_fd(None))
        _close(self.replace_err_fd(None))

    # -- ring operations (supervisor hot path) -----------------------------------------------
    @property
    def avail_idx(self) -> int:
        """The driver's current avail.idx (diagnostics and tests)."""
        if self._avail is None:
            raise VringError(f"queue {self.index}: not mapped")
        return self._avail[1]

    def pop_avail(self) -> list[int]:
        """Consume every new avail entry; returns the heads in ring order.

        With EVENT_IDX, publishes `avail_event = last_avail_idx`, fences and re-checks
        avail.idx before returning (B.3 step 5), so a request added meanwhile is either
        returned now or announced by a kick. At most `size` heads per call. Returns [] unless
        `ready`. Raises VringError if avail.idx ran more than `size` ahead (broken driver).
        """
        avail = self._avail
        used = self._used
        if avail is None or used is None or not (self.started and self.enabled):
            return []
        size = self.size
        mask = self._mask
        last = self.last_avail_idx
        heads: list[int] = []
        while True:
            avail_idx = avail[1]  # (acquire: free on x86)
            n = (avail_idx - last) & 0xFFFF
            if n > size:
                raise VringError(f"queue {self.index}: avail.idx {avail_idx} is {n} ahead of "
                                 f"last_avail_idx {last} (queue size {size})")
            n = min(n, size - len(heads))
            if n:
                start = last & mask
                end = start + n
                if end <= size:
                    heads += avail[2 + start : 2 + end].tolist()
                else:
                    heads += avail[2 + start : 2 + size].tolist()
                    heads += avail[2 : 2 + end - size].tolist()
                last = (last + n) & 0xFFFF
                self.last_avail_idx = last
            if not self.event_idx:
                return heads
            used[self._avail_event_at] = last
            if len(heads) >= size:
                # A full ring: the driver cannot add more before we return some; no re-check.
                return heads
            full_fence()  # store avail_event -> load avail.idx
            if avail[1] == last:
                return heads

    def push_used(self, head: int, length: int) -> None:
        """Return one chain: the element first, then `used.idx` in one 16-bit store."""
        elems = self._used_elems
        used = self._used
        if elems is None or used is None:
            raise VringError(f"queue {self.index}: push_used on an unmapped ring")
        idx = self.used_idx
        elems[idx & self._mask] = head | (length << 32)
        idx = (idx + 1) & 0xFFFF
        used[1] = idx  # (release: free on x86)
        self.used_idx = idx

    def push_used_batch(self, elements: list[tuple[int, int]]) -> None:
        """Return several (head, length) chains with a single `used.idx` publication."""
        self.push_used_elems([head | length << 32 for head, length in elements])

    def push_used_elems(self, elements: list[int]) -> None:
        """`push_used_batch` for elements already encoded as `id | len << 32` (the u64 a used
        element is): one slice store when the batch does not wrap, then one `used.idx`."""
        elems = self._used_elems
        used = self._used
        if elems is None or used is None:
            raise VringError(f"queue {self.index}: push_used on an unmapped ring")
        n = len(elements)
        if not n:
            return
        idx = self.used_idx
        start = idx & self._mask
        end = start + n
        if end <= self.size:
            elems[start:end] = array("Q", elements)
        else:
            mask = self._mask
            for i, elem in enumerate(elements):
                elems[(idx + i) & mask] = elem
        idx = (idx + n) & 0xFFFF
        used[1] = idx
        self.used_idx = idx

    def needs_notification(self) -> bool:
        """Should the driver be interrupted for what was pushed since the last decision?
        EVENT_IDX: `vring_need_event(used_event, used_idx, signalled_used)`; otherwise unless
        avail.flags has NO_INTERRUPT. Full fence first (store used.idx -> load used_event)."""
        avail = self._avail
        if avail is None:
            return False
        full_fence()
        if not self.event_idx:
            return not avail[0] & VRING_AVAIL_F_NO_INTERRUPT
        new = self.used_idx
        old = self.signalled_used
        valid = self.signalled_used_valid
        self.signalled_used = new
        self.signalled_used_valid = True
        return not valid or vring_need_event(avail[self._used_event_at], new, old)

    def notify(self) -> None:
        """Signal the driver (write the call eventfd); no-op without a call fd (NOFD)."""
        if self.call_fd is not None:
            os.eventfd_write(self.call_fd, 1)

    def __repr__(self) -> str:
        return (f"Vring(index={self.index}, size={self.size}, started={self.started}, "
                f"enabled={self.enabled}, last_avail_idx={self.last_avail_idx}, "
                f"used_idx={self.used_idx})")


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
