"""A vhost-user front-end: plays QEMU 7.2 and the guest's virtio driver against a back-end.

Used by the test suite and by `vfsd bench`. Three layers, usable on their own:

* `GuestRam` - "guest RAM": a memfd mapped here, split into memory-table regions like a pc
  machine (a low 640 KiB region and the rest, same memfd, `mmap_offset == gpa`), with a small
  first-fit allocator for rings and buffers.
* `DriverQueue` - the driver side of one split virtqueue in that RAM (what Linux
  `virtio_ring.c` does): builds direct or indirect chains, publishes avail entries, reaps used
  entries, honours EVENT_IDX both ways (reads `avail_event` to decide kicks, writes
  `used_event`). Raw descriptor access for hostile tests.
* `VhostUserClient` - the socket side: the QEMU 7.2 handshake (PROTOCOLS.md A.6, incl.
  REPLY_ACK and CONFIGURE_MEM_SLOTS with ADD_MEM_REG, or SET_MEM_TABLE when the back-end
  lacks it), kick/call eventfds, `submit`/`wait`, queue stop (GET_VRING_BASE) and restart.

No FUSE knowledge here. Ring addresses sent in SET_VRING_ADDR are synthetic "QEMU virtual
addresses" (`va_base + mmap_offset`): a back-end only uses them as translation keys.

Example::

    client = VhostUserClient.connect("/run/vfsd.sock", num_queues=2)
    client.realize()
    client.start()
    head = client.submit(1, [request_bytes], [4096])
    [done] = client.wait(1, timeout=5)
    client.close()
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from vfsd.transport.abi import (
    DESC,
    PROTOCOL_F_CONFIG,
    PROTOCOL_F_CONFIGURE_MEM_SLOTS,
    PROTOCOL_F_MQ,
    PROTOCOL_F_REPLY_ACK,
    PROTOCOL_FEATURES_QEMU72_MASK,
    U64,
    USED_ELEM,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_STATE,
    VRING_USED_F_NO_NOTIFY,
    VhostUserRequest,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from vfsd.transport.codec import (
    AddMemReg,
    RemMemReg,
    SetMemTable,
    U64Payload,
    VringAddr,
    VringFile,
    VringState,
    close_fds,
    decode_reply,
    encode_request,
)
from vfsd.transport.connection import recv_frame, send_message
from vfsd.transport.memory import MemRegion
from vfsd.transport.virtqueue import full_fence, vring_need_event

R = VhostUserRequest

DEFAULT_MEM_SIZE = 64 << 20
DEFAULT_VA_BASE = 0x7F3A_0000_0000  # where "QEMU" pretends guest RAM is mapped
PC_LOW_RAM = 0xA0000  # pc machine: RAM below the VGA hole, then from 0xC0000 on (A.6 trace)
PC_HIGH_START = 0xC0000

# What the Linux 6.1 virtio-fs driver acks when offered (A.3, B.4).
DRIVER_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
WANTED_PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIGURE_MEM_SLOTS

# Requests QEMU always reads a reply for.
_ALWAYS_REPLIED = frozenset({R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
                             R.GET_MAX_MEM_SLOTS, R.GET_VRING_BASE, R.GET_CONFIG, R.GET_STATUS,
                             R.GET_INFLIGHT_FD})


class FrontendError(Exception):
    """The back-end misbehaved (bad reply, refused request, impossible used entry)."""


# -- guest RAM -------------------------------------------------------------------------------
class GuestRam:
    """A memfd standing in for guest RAM, mapped in this process, plus an allocator.

    `layout` lists regions as (guest_phys_addr, memory_size, mmap_offset); the default is the
    pc layout seen live: [0, 640 KiB) and [0xC0000, size), both at mmap_offset == gpa.
    """

    def __init__(self, size: int = DEFAULT_MEM_SIZE,
                 layout: Sequence[tuple[int, int, int]] | None = None,
                 va_base: int = DEFAULT_VA_BASE) -> None:
        if layout is None:
            layout = [(0, PC_LOW_RAM, 0), (PC_HIGH_START, size - PC_HIGH_START, PC_HIGH_START)]
        self.size = size
        self.fd = os.memfd_create("vfsd-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = memoryview(self._mm)
        self.regions = [MemRegion(gpa, length, va_base + off, off) for gpa, length, off in layout]
        for r in self.regions:
            if r.mmap_offset + r.memory_size > size:
                raise ValueError(f"region {r} beyond the {size}-byte memfd")
        # Free GPA ranges [start, end), sorted; allocations remember their size.
        self._free = sorted((r.guest_phys_addr, r.gpa_end) for r in self.regions)
        self._sizes: dict[int, int] = {}

    # addresses
    def file_offset(self, gpa: int, length: int = 0) -> int:
        """Offset in the memfd of `[gpa, gpa+length)` (which must lie in one region)."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa and gpa + length <= r.gpa_end:
                return gpa - r.guest_phys_addr + r.mmap_offset
        raise ValueError(f"[{gpa:#x}, +{length:#x}) is not guest RAM")

    def gpa_to_va(self, gpa: int) -> int:
        """The front-end virtual address of a GPA (what SET_VRING_ADDR carries)."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa < r.gpa_end:
                return gpa - r.guest_phys_addr + r.userspace_addr
        raise ValueError(f"{gpa:#x} is not guest RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        off = self.file_offset(gpa, length)
        return self._buf[off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    # allocation
    def alloc(self, size: int, align: int = 16) -> int:
        """First-fit allocation of `size` bytes (at least 1) inside one region."""
        size = max(size, 1)
        for i, (start, end) in enumerate(self._free):
            gpa = -(-start // align) * align
            if gpa + size <= end:
                pieces = [(s, e) for s, e in ((start, gpa), (gpa + size, end)) if s < e]
                self._free[i : i + 1] = pieces
                self._sizes[gpa] = size
                return gpa
        raise MemoryError(f"guest RAM exhausted allocating {size} bytes")

    def free(self, gpa: int) -> None:
        size = self._sizes.pop(gpa)
        self._free.append((gpa, gpa + size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, end in self._free:
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        self._free = merged

    @property
    def allocated(self) -> int:
        return sum(self._sizes.values())

    def close(self) -> None:
        if self.fd < 0:
            return
        self._buf.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive; unmapped when it goes
        os.close(self.fd)
        self.fd = -1


# -- the driver side of one split virtqueue --------------------------------------------------
@dataclass(frozen=True, slots=True)
class Completion:
    """One used entry: the head, the device's `len`, and that many bytes of the writable part."""

    head: int
    used_len: int
    data: bytes


@dataclass(slots=True)
class _Inflight:
    descs: list[int]  # ring descriptors to free
    buffers: list[int]  # GPAs allocated for this chain (buffers and indirect table)
    writable: list[tuple[int, int]]  # (gpa, len) of the device-writable buffers, in order


class DriverQueue:
    """Driver side of a split ring in `GuestRam` (Linux `virtio_ring.c` split, simplified)."""

    def __init__(self, ram: GuestRam, index: int, size: int, *, event_idx: bool,
                 indirect: bool) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of 2")
        self.ram = ram
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_gpa = ram.alloc(desc_table_size(size), 16)
        self.avail_gpa = ram.alloc(avail_ring_size(size), 2)
        self.used_gpa = ram.alloc(used_ring_size(size), 4)
        self._desc = ram.view(self.desc_gpa, desc_table_size(size))
        self._avail = ram.view(self.avail_gpa, avail_ring_size(size)).cast("H")
        self._used_bytes = ram.view(self.used_gpa, used_ring_size(size))
        self._used = self._used_bytes.cast("H")
        self._used_event_at = 2 + size
        self._avail_event_at = 2 + 4 * size
        self._inflight: dict[int, _Inflight] = {}
        self.reset()

    def reset(self) -> None:
        """Device reset from the driver's view: empty rings, every descriptor free."""
        for pending in self._inflight.values():
            for gpa in pending.buffers:
                self.ram.free(gpa)
        self._inflight.clear()
        self._desc[:] = bytes(len(self._desc))
        self._avail.cast("B")[:] = bytes(len(self._avail) * 2)
        self._used_bytes[:] = bytes(len(self._used_bytes))
        self._free_descs: deque[int] = deque(range(self.size))
        self.avail_idx = 0  # shadow of avail.idx
        self.last_used_idx = 0
        self.num_added = 0  # published since the last kick decision

    # raw access (hostile tests)
    def take_descs(self, n: int) -> list[int]:
        """Reserve `n` ring descriptors (for raw chains); freed when their head completes."""
        if n > len(self._free_descs):
            raise MemoryError(f"queue {self.index}: {n} descriptors wanted, "
                              f"{len(self._free_descs)} free")
        return [self._free_descs.popleft() for _ in range(n)]

    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write ring descriptor `i` verbatim (any address, length, flags, next)."""
        DESC.pack_into(self._desc, 16 * i, addr, length, flags, next_)

    def track(self, head: int, descs: list[int], buffers: Sequence[int] = (),
              writable: Sequence[tuple[int, int]] = ()) -> None:
        """Register a raw chain so its completion frees `descs` and `buffers`."""
        self._inflight[head] = _Inflight(list(descs), list(buffers), list(writable))

    def publish(self, head: int) -> None:
        """Put `head` in the next avail slot, then bump avail.idx with one 16-bit store."""
        self._avail[2 + (self.avail_idx & (self.size - 1))] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._avail[1] = self.avail_idx
        self.num_added += 1

    def set_avail_idx(self, value: int) -> None:
        """Raw: write avail.idx (e.g. run it more than `size` ahead)."""
        self.avail_idx = value & 0xFFFF
        self._avail[1] = self.avail_idx

    def set_avail_flags(self, flags: int) -> None:
        self._avail[0] = flags

    @property
    def avail_event(self) -> int:
        return self._used[self._avail_event_at]

    @property
    def used_idx(self) -> int:
        return self._used[1]

    @property
    def free_descs(self) -> int:
        return len(self._free_descs)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # chains
    def add(self, readable: Sequence[bytes], writable_sizes: Sequence[int],
            indirect: bool | None = None) -> int:
        """Build a chain (one indirect descriptor pointing at a table, or NEXT-linked ring
        descriptors), copy `readable` in, publish it; returns the head. No kick."""
        if indirect is None:
            indirect = self.indirect and len(readable) + len(writable_sizes) > 1
        if indirect and not self.indirect:
            raise ValueError("INDIRECT_DESC was not negotiated")
        elems: list[tuple[int, int, int]] = []
        buffers: list[int] = []
        writable: list[tuple[int, int]] = []
        for data in readable:
            gpa = self.ram.alloc(len(data))
            self.ram.write(gpa, data)
            buffers.append(gpa)
            elems.append((gpa, len(data), 0))
        for size in writable_sizes:
            gpa = self.ram.alloc(size)
            buffers.append(gpa)
            writable.append((gpa, size))
            elems.append((gpa, size, VRING_DESC_F_WRITE))
        n = len(elems)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = self.ram.alloc(16 * n, 16)
            buffers.append(table)
            view = self.ram.view(table, 16 * n)
            for i, (addr, length, flags) in enumerate(elems):
                last = i == n - 1
                DESC.pack_into(view, 16 * i, addr, length,
                               flags | (0 if last else VRING_DESC_F_NEXT), 0 if last else i + 1)
            descs = self.take_descs(1)
            self.write_desc(descs[0], table, 16 * n, VRING_DESC_F_INDIRECT, 0)
        else:
            descs = self.take_descs(n)
            for i, (addr, length, flags) in enumerate(elems):
                last = i == n - 1
                self.write_desc(descs[i], addr, length, flags | (0 if last else VRING_DESC_F_NEXT),
                                0 if last else descs[i + 1])
        head = descs[0]
        self.track(head, descs, buffers, writable)
        self.publish(head)
        return head

    def kick_prepare(self) -> bool:
        """Does the device want a kick for what was published since the last call?
        (Linux `virtqueue_kick_prepare_split`: EVENT_IDX uses the device's avail_event.)"""
        full_fence()  # publish avail.idx before reading avail_event / used.flags
        new = self.avail_idx
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            return vring_need_event(self.avail_event, new, old)
        return not self._used[0] & VRING_USED_F_NO_NOTIFY

    def reap(self) -> list[Completion]:
        """Take every new used entry; frees its descriptors and buffers."""
        done: list[Completion] = []
        while self.last_used_idx != self._used[1]:
            slot = self.last_used_idx & (self.size - 1)
            head, used_len = USED_ELEM.unpack_from(self._used_bytes, 4 + 8 * slot)
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            done.append(self._complete(head, used_len))
        if self.event_idx:
            # Interrupt me for the next used entry (Linux writes used_event = last_used_idx).
            self._avail[self._used_event_at] = self.last_used_idx
        return done

    def has_used(self) -> bool:
        full_fence()  # the used_event store above -> this used.idx load
        return self.last_used_idx != self._used[1]

    def _complete(self, head: int, used_len: int) -> Completion:
        pending = self._inflight.pop(head, None)
        if pending is None:
            raise FrontendError(f"queue {self.index}: device used head {head}, not in flight")
        data = bytearray()
        for gpa, size in pending.writable:
            if len(data) >= used_len:
                break
            data += self.ram.read(gpa, min(size, used_len - len(data)))
        for gpa in pending.buffers:
            self.ram.free(gpa)
        self._free_descs.extend(pending.descs)
        return Completion(head, used_len, bytes(data))


# -- the socket side -------------------------------------------------------------------------
class VhostUserClient:
    """QEMU's half of a vhost-user-fs connection plus the guest driver's rings."""

    def __init__(self, sock: socket.socket, *, ram: GuestRam | None = None,
                 mem_size: int = DEFAULT_MEM_SIZE, num_queues: int = 2, queue_size: int = 128,
                 features: int = DRIVER_FEATURES,
                 protocol_features: int = WANTED_PROTOCOL_FEATURES,
                 timeout: float = 5.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)  # a silent back-end fails the call instead of hanging
        self.ram = ram if ram is not None else GuestRam(mem_size)
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.driver_features = features
        self.wanted_protocol_features = protocol_features
        self.backend_features = 0
        self.acked_features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.queues: list[DriverQueue] = []
        self.bases: list[int] = [0] * num_queues  # last GET_VRING_BASE answers
        self._sent_regions: list[MemRegion] = []
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self.kick_fds = [os.eventfd(0, flags) for _ in range(num_queues)]
        self.call_fds = [os.eventfd(0, flags) for _ in range(num_queues)]
        self.err_fds = [os.eventfd(0, flags) for _ in range(num_queues)]

    @classmethod
    def connect(cls, path: str, **kwargs: object) -> VhostUserClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock, **kwargs)  # type: ignore[arg-type]

    # -- messages ------------------------------------------------------------------------------
    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & PROTOCOL_F_REPLY_ACK)

    @property
    def has_protocol_features(self) -> bool:
        return bool(self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES)

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                need_reply: bool = False, reply_size: int | None = None) -> bytes | None:
        """Send any request; read the reply if it is a GET_* or `need_reply` (raw access)."""
        send_message(self.sock, encode_request(request, payload, need_reply=need_reply), fds)
        if request in _ALWAYS_REPLIED or need_reply:
            header, body, stray = recv_frame(self.sock)
            close_fds(stray)
            return decode_reply(request, header, body, size=reply_size)
        return None

    def _get_u64(self, request: int) -> int:
        body = self.request(request, reply_size=U64.size)
        assert body is not None
        return U64.unpack(body)[0]

    def _set(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             ack: bool = False) -> None:
        """A SET_* request; with `ack` and REPLY_ACK negotiated, wait for and check the ack."""
        want = ack and self.reply_ack
        body = self.request(request, payload, fds, need_reply=want, reply_size=U64.size)
        if want:
            assert body is not None
            if U64.unpack(body)[0] != 0:
                raise FrontendError(f"back-end refused {R(request).name}")

    def sync(self) -> None:
        """Round trip (GET_FEATURES, QEMU's `enforce_reply` barrier): when it returns, the
        back-end has handled every earlier message."""
        self._get_u64(R.GET_FEATURES)

    # -- QEMU 7.2 sequences (A.6) --------------------------------------------------------------
    def realize(self) -> None:
        """Device realize: feature and protocol negotiation, SET_OWNER, call/err fds."""
        self.backend_features = self._get_u64(R.GET_FEATURES)
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            offered = self._get_u64(R.GET_PROTOCOL_FEATURES)
            self.protocol_features = (offered & self.wanted_protocol_features
                                      & PROTOCOL_FEATURES_QEMU72_MASK & ~PROTOCOL_F_CONFIG)
            self._set(R.SET_PROTOCOL_FEATURES, U64Payload(self.protocol_features).pack())
        if self.protocol_features & PROTOCOL_F_MQ:
            self.queue_num = self._get_u64(R.GET_QUEUE_NUM)
            if self.queue_num < self.num_queues:
                raise FrontendError(f"back-end serves {self.queue_num} queues, "
                                    f"{self.num_queues} wanted")
        if self.protocol_features & PROTOCOL_F_CONFIGURE_MEM_SLOTS:
            self.max_mem_slots = self._get_u64(R.GET_MAX_MEM_SLOTS)
            if self.max_mem_slots < len(self.ram.regions):
                raise FrontendError(f"back-end has {self.max_mem_slots} memory slots")
        self._set(R.SET_OWNER)
        self._get_u64(R.GET_FEATURES)
        for i in range(self.num_queues):
            self._set_vring_fd(R.SET_VRING_CALL, i, self.call_fds[i])
            self._set_vring_fd(R.SET_VRING_ERR, i, self.err_fds[i])

    def start(self, *, reset: bool = True) -> None:
        """Device start (guest DRIVER_OK). `reset=False` resumes every queue at the index the
        last `stop` returned (VM pause/resume) instead of a fresh ring (guest reset)."""
        for i in range(self.num_queues):
            self._set_vring_fd(R.SET_VRING_CALL, i, self.call_fds[i])
        self.acked_features = (self.backend_features & self.driver_features) | (
            self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES)
        self._set(R.SET_FEATURES, U64Payload(self.acked_features).pack())
        self.send_memory()
        event_idx = bool(self.acked_features & VIRTIO_RING_F_EVENT_IDX)
        indirect = bool(self.acked_features & VIRTIO_RING_F_INDIRECT_DESC)
        if not self.queues:
            self.queues = [DriverQueue(self.ram, i, self.queue_size, event_idx=event_idx,
                                       indirect=indirect) for i in range(self.num_queues)]
        for q in self.queues:
            q.event_idx, q.indirect = event_idx, indirect
            if reset:
                q.reset()
                self.bases[q.index] = 0
            self._setup_ring(q.index, self.bases[q.index])
        if self.has_protocol_features:
            for i in range(self.num_queues):
                self._set(R.SET_VRING_ENABLE, VringState(i, 1).pack())
        for i in range(self.num_queues):
            self._set_vring_fd(R.SET_VRING_CALL, i, self.call_fds[i])
        self.sync()

    def stop(self) -> list[int]:
        """Device stop: disable every ring, GET_VRING_BASE each, re-send call fds."""
        if self.has_protocol_features:
            for i in range(self.num_queues):
                self._set(R.SET_VRING_ENABLE, VringState(i, 0).pack())
        for i in range(self.num_queues):
            self.bases[i] = self._get_vring_base(i)
        for i in range(self.num_queues):
            self._set_vring_fd(R.SET_VRING_CALL, i, self.call_fds[i])
        return list(self.bases)

    def send_memory(self) -> None:
        """The memory table: only the new regions via ADD_MEM_REG with CONFIGURE_MEM_SLOTS
        (so nothing on a restart), else the whole table via SET_MEM_TABLE every time."""
        fd = self.ram.fd
        if self.protocol_features & PROTOCOL_F_CONFIGURE_MEM_SLOTS:
            for region in self._sent_regions:
                if region not in self.ram.regions:
                    self._set(R.REM_MEM_REG, RemMemReg(region).pack(), ack=True)
            for region in self.ram.regions:
                if region not in self._sent_regions:
                    self._set(R.ADD_MEM_REG, AddMemReg(region, fd).pack(), [fd], ack=True)
        else:
            regions = tuple(self.ram.regions)
            table = SetMemTable(regions, (fd,) * len(regions))
            self._set(R.SET_MEM_TABLE, table.pack(), table.fds, ack=True)
        self._sent_regions = list(self.ram.regions)

    def _setup_ring(self, index: int, base: int) -> None:
        q = self.queues[index]
        self._set(R.SET_VRING_NUM, VringState(index, q.size).pack())
        self._set(R.SET_VRING_BASE, VringState(index, base).pack())
        va = self.ram.gpa_to_va
        addr = VringAddr(index, 0, va(q.desc_gpa), va(q.used_gpa), va(q.avail_gpa), q.used_gpa)
        self._set(R.SET_VRING_ADDR, addr.pack())
        self._set_vring_fd(R.SET_VRING_KICK, index, self.kick_fds[index])
        # QEMU kicks each queue right after SET_VRING_KICK (seen live, trap 6).
        os.eventfd_write(self.kick_fds[index], 1)

    def _set_vring_fd(self, request: int, index: int, fd: int | None) -> None:
        payload = VringFile(index, fd is None, fd).pack()
        self._set(request, payload, [] if fd is None else [fd])

    def replace_call_fd(self, index: int) -> None:
        """SET_VRING_CALL with a fresh eventfd while the queue runs (QEMU does so when the
        guest's interrupt routing changes); the old fd is closed, as QEMU may."""
        new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._set_vring_fd(R.SET_VRING_CALL, index, new)
        os.close(self.call_fds[index])
        self.call_fds[index] = new

    def _get_vring_base(self, index: int) -> int:
        body = self.request(R.GET_VRING_BASE, VringState(index, 0).pack(),
                            reply_size=VRING_STATE.size)
        assert body is not None
        got_index, num = VRING_STATE.unpack(body)
        if got_index != index:
            raise FrontendError(f"GET_VRING_BASE({index}) answered for queue {got_index}")
        return num

    # -- per-queue stop / restart --------------------------------------------------------------
    def stop_queue(self, index: int) -> int:
        """Disable + GET_VRING_BASE + re-send the call fd; returns the back-end's next avail
        index (also kept for `start_queue`)."""
        if self.has_protocol_features:
            self._set(R.SET_VRING_ENABLE, VringState(index, 0).pack())
        self.bases[index] = self._get_vring_base(index)
        self._set_vring_fd(R.SET_VRING_CALL, index, self.call_fds[index])
        return self.bases[index]

    def start_queue(self, index: int, base: int | None = None, *, reset: bool = False) -> None:
        """Restart a stopped queue: `reset` = the guest re-initialised it (empty rings, base
        0); otherwise continue from `base` (default: what `stop_queue` returned)."""
        q = self.queues[index]
        if reset:
            q.reset()
            base = 0
        elif base is None:
            base = self.bases[index]
        self._setup_ring(index, base)
        if self.has_protocol_features:
            self._set(R.SET_VRING_ENABLE, VringState(index, 1).pack())
        self._set_vring_fd(R.SET_VRING_CALL, index, self.call_fds[index])
        self.sync()

    # -- I/O -----------------------------------------------------------------------------------
    def submit(self, queue: int, readable: Sequence[bytes], writable_sizes: Sequence[int] = (),
               indirect: bool | None = None, *, kick: bool = True) -> int:
        """Queue one request chain; returns its head. `indirect=None` does what Linux does
        (an indirect table for multi-buffer chains when negotiated)."""
        head = self.queues[queue].add(readable, writable_sizes, indirect)
        if kick:
            self.kick(queue)
        return head

    def kick(self, queue: int, *, force: bool = False) -> bool:
        """Kick if the device asked for it (EVENT_IDX / NO_NOTIFY) or if `force`."""
        if self.queues[queue].kick_prepare() or force:
            os.eventfd_write(self.kick_fds[queue], 1)
            return True
        return False

    def wait(self, queue: int, timeout: float = 5.0, count: int = 1) -> list[Completion]:
        """Collect completions until `count` arrived or `timeout` passed (then possibly
        fewer). Sleeps on the call eventfd; re-checks the used ring around each sleep."""
        q = self.queues[queue]
        deadline = time.monotonic() + timeout
        done = q.reap()
        poller = select.poll()
        poller.register(self.call_fds[queue], select.POLLIN)
        while len(done) < count:
            if q.has_used():
                done += q.reap()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # No polling fallback: a back-end that forgets to signal makes this time out.
            if poller.poll(left * 1000):
                try:
                    os.eventfd_read(self.call_fds[queue])
                except BlockingIOError:
                    pass
            done += q.reap()
        return done

    def drain_call(self, queue: int) -> int:
        """Read (and reset) the call eventfd counter: how many signals arrived (tests)."""
        try:
            return os.eventfd_read(self.call_fds[queue])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            for fd in (*self.kick_fds, *self.call_fds, *self.err_fds):
                try:
                    os.close(fd)
                except OSError as e:
                    if e.errno != errno.EBADF:
                        raise
            self.queues = []
            self.ram.close()

    def __enter__(self) -> VhostUserClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
