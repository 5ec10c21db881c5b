"""vhost-user back-end: request by request, then against the front-end over a socketpair."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import defaultdict

import pytest

from vfsd.frontend import FrontendError, VhostUserClient
from vfsd.frontend.vhost_client import DRIVER_FEATURES, WANTED_PROTOCOL_FEATURES
from vfsd.transport import GuestProtocolError
from vfsd.transport.abi import (
    PROTOCOL_F_CONFIGURE_MEM_SLOTS,
    PROTOCOL_F_MQ,
    PROTOCOL_F_REPLY_ACK,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_NEXT,
    VRING_STATE,
    VhostUserRequest,
)
from vfsd.transport.backend import RULES, VhostUserBackend
from vfsd.transport.codec import (
    READERS,
    AddMemReg,
    RemMemReg,
    SetMemTable,
    U64Payload,
    VringAddr,
    VringFile,
    VringState,
    decode,
    encode_request,
)
from vfsd.transport.connection import PeerClosed, recv_message, send_message
from vfsd.transport.memory import MemRegion
from vfsd.transport.virtqueue import Vring, read_chain

R = VhostUserRequest
H = bytes.fromhex
ACK_OK = H("05000000" "08000000") + bytes(8)


class RecordingDevice:
    """A trivial virtio-fs stand-in: records every callback and answers each chain by copying
    its readable bytes into its writable part (or holds chains in flight when `hold`)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.mem = None
        self.hold = False
        self.held: dict[int, list[int]] = defaultdict(list)
        self.errors: list[GuestProtocolError] = []

    # VirtioFsDevice
    def memory_changed(self, mem) -> None:
        self.mem = mem
        self.events.append(("memory_changed", len(mem)))

    def queue_started(self, vring: Vring) -> None:
        self.events.append(("queue_started", vring.index))

    def queue_enabled(self, vring: Vring, enabled: bool) -> None:
        self.events.append(("queue_enabled", vring.index, enabled))
        if enabled and vring.started:
            self.process(vring)

    def queue_stopping(self, vring: Vring) -> None:
        self.events.append(("queue_stopping", vring.index, vring.last_avail_idx))
        held, self.held[vring.index] = self.held[vring.index], []
        for head in held:
            self.complete(vring, head)
        if held and vring.needs_notification():
            vring.notify()

    def kick_fd_changed(self, vring: Vring, old_fd: int | None) -> None:
        self.events.append(("kick_fd_changed", vring.index))

    def call_fd_changed(self, vring: Vring) -> None:
        self.events.append(("call_fd_changed", vring.index, vring.call_fd is not None))

    # the supervisor's part, in miniature
    def process(self, vring: Vring) -> None:
        try:
            heads = vring.pop_avail()
        except GuestProtocolError as e:
            self.errors.append(e)
            return
        for head in heads:
            if self.hold:
                self.held[vring.index].append(head)
            else:
                self.complete(vring, head)
        if heads and not self.hold and vring.needs_notification():
            vring.notify()

    def complete(self, vring: Vring, head: int) -> None:
        written = 0
        try:
            chain = read_chain(self.mem, vring.desc_gpa, vring.size, head)
            data = b"".join(chain.readable)
            for view in chain.writable:
                n = min(len(view), len(data) - written)
                view[:n] = data[written : written + n]
                written += n
        except GuestProtocolError as e:
            self.errors.append(e)
        vring.push_used(head, written)

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


def message(request: int, payload: bytes = b"", fds: tuple[int, ...] = (), *,
            need_reply: bool = False):
    """A decoded request whose fds are fresh dups (the back-end closes what it gets)."""
    frame = encode_request(request, payload, need_reply=need_reply)
    return decode(frame[:12], frame[12:], [os.dup(fd) for fd in fds])


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


@pytest.fixture
def memfd():
    fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    yield fd
    os.close(fd)


@pytest.fixture
def efd():
    fds: list[int] = []

    def make() -> int:
        fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture
def be():
    device = RecordingDevice()
    backend = VhostUserBackend(device, num_queues=2)
    yield backend
    backend.close()


def negotiate(backend, *, features=DRIVER_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES,
              protocol=WANTED_PROTOCOL_FEATURES) -> None:
    assert backend.handle(message(R.SET_PROTOCOL_FEATURES, U64Payload(protocol).pack())) is None
    assert backend.handle(message(R.SET_OWNER)) is None
    assert backend.handle(message(R.SET_FEATURES, U64Payload(features).pack())) is None


LOW = MemRegion(0, 0x80000, 0x7F00_0000_0000, 0)
HIGH = MemRegion(0xC0000, 0x40000, 0x7F00_000C_0000, 0xC0000)


def place_ring(backend, memfd, index: int = 1, size: int = 16) -> None:
    """SET_MEM_TABLE + NUM/BASE/ADDR: desc at gpa 0x1000, avail 0x2000, used 0x3000."""
    backend.handle(message(R.SET_MEM_TABLE, SetMemTable((LOW, HIGH), ()).pack(), (memfd, memfd)))
    backend.handle(message(R.SET_VRING_NUM, VringState(index, size).pack()))
    backend.handle(message(R.SET_VRING_BASE, VringState(index, 0).pack()))
    va = LOW.userspace_addr
    addr = VringAddr(index, 0, va + 0x1000, va + 0x3000, va + 0x2000, 0x3000)
    assert backend.handle(message(R.SET_VRING_ADDR, addr.pack())) is None


# -- request by request ----------------------------------------------------------------------
def test_get_features_replies(be):
    assert be.handle(message(R.GET_FEATURES)) == H("01000000" "05000000" "08000000"
                                                   "0000007001000000")
    assert be.handle(message(R.GET_PROTOCOL_FEATURES)) == H("0f000000" "05000000" "08000000"
                                                            "0980000000000000")


def test_offered_features_are_exactly_what_we_implement(be):
    assert be.features == (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC
                           | VIRTIO_RING_F_EVENT_IDX | VHOST_USER_F_PROTOCOL_FEATURES)
    assert be.protocol_features == (PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK
                                    | PROTOCOL_F_CONFIGURE_MEM_SLOTS)


def test_acks_only_with_reply_ack_negotiated_and_need_reply(be):
    assert be.handle(message(R.SET_OWNER, need_reply=True)) is None  # no REPLY_ACK yet
    be.handle(message(R.SET_PROTOCOL_FEATURES, U64Payload(PROTOCOL_F_REPLY_ACK).pack()))
    assert be.handle(message(R.SET_OWNER)) is None
    assert be.handle(message(R.SET_OWNER, need_reply=True)) == H("03000000") + ACK_OK


def test_get_requests_are_answered_once_even_with_need_reply(be):
    negotiate(be)
    reply = be.handle(message(R.GET_QUEUE_NUM, need_reply=True))
    assert reply == H("11000000" "05000000" "08000000") + U64.pack(2)
    reply = be.handle(message(R.GET_MAX_MEM_SLOTS, need_reply=True))
    assert reply[12:] == U64.pack(32)


def test_unsupported_requests_are_refused_never_fatal(be, efd):
    assert be.handle(message(99)) is None  # no ack asked: logged only
    negotiate(be)
    fd = efd()
    before = open_fds()
    reply = be.handle(message(R.SET_SLAVE_REQ_FD, b"", (fd,), need_reply=True))
    assert reply[:8] == H("15000000" "05000000") and U64.unpack(reply[12:])[0] != 0
    assert open_fds() == before, "the unsupported request's fd must be closed"
    assert be.handle(message(R.SET_LOG_BASE, bytes(16), (fd,))) is None
    assert be.handle(message(200, b"xyz", need_reply=True))[12:] != bytes(8)
    assert be.errors == 4 and be.last_error.startswith("UNKNOWN(200)")


def refused(reply: bytes | None) -> bool:
    return reply is not None and U64.unpack(reply[12:])[0] != 0


def test_legality_table(be, memfd, efd):
    be.handle(message(R.SET_PROTOCOL_FEATURES, U64Payload(PROTOCOL_F_REPLY_ACK).pack()))
    # Everything touching rings or memory needs SET_OWNER first.
    assert refused(be.handle(message(R.SET_VRING_NUM, VringState(1, 16).pack(),
                                     need_reply=True)))
    be.handle(message(R.SET_OWNER))
    assert be.handle(message(R.SET_VRING_NUM, VringState(1, 16).pack(), need_reply=True)) == (
        H("08000000") + ACK_OK)
    # SET_VRING_ENABLE needs bit 30 acked; ADD_MEM_REG needs CONFIGURE_MEM_SLOTS negotiated.
    assert refused(be.handle(message(R.SET_VRING_ENABLE, VringState(1, 1).pack(),
                                     need_reply=True)))
    assert refused(be.handle(message(R.ADD_MEM_REG, AddMemReg(LOW, 0).pack(), (memfd,),
                                     need_reply=True)))
    # Only offered features can be acked.
    assert refused(be.handle(message(R.SET_FEATURES, U64Payload(1 << 34).pack(),
                                     need_reply=True)))
    assert refused(be.handle(message(R.SET_PROTOCOL_FEATURES, U64Payload(1 << 9).pack(),
                                     need_reply=True)))
    assert be.acked_protocol_features == PROTOCOL_F_REPLY_ACK  # unchanged by the refusal
    # GET_QUEUE_NUM without MQ: a GET is answered anyway (QEMU would hang otherwise).
    assert be.handle(message(R.GET_QUEUE_NUM))[12:] == U64.pack(2)
    assert set(RULES) <= set(READERS)  # every handled request has a typed payload
    assert set(RULES) >= {R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.RESET_OWNER,
                          R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
                          R.GET_MAX_MEM_SLOTS, R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG,
                          R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE,
                          R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR,
                          R.SET_VRING_ENABLE, R.RESET_DEVICE}


def test_queue_index_out_of_range(be, efd):
    negotiate(be)
    assert refused(be.handle(message(R.SET_VRING_CALL, VringFile(2, False, 0).pack(), (efd(),),
                                     need_reply=True)))
    assert be.handle(message(R.SET_VRING_NUM, VringState(7, 16).pack())) is None  # logged
    reply = be.handle(message(R.GET_VRING_BASE, VringState(9, 0).pack()))
    assert VRING_STATE.unpack(reply[12:]) == (9, 0)  # still answered: QEMU waits for it


def test_set_features_without_protocol_bit_enables_every_ring(be):
    be.handle(message(R.SET_OWNER))
    be.handle(message(R.SET_FEATURES, U64Payload(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX)
                      .pack()))
    assert all(v.enabled and v.event_idx for v in be.vrings)
    assert be.device.events == [("queue_enabled", 0, True), ("queue_enabled", 1, True)]
    assert be.handle(message(R.SET_VRING_ENABLE, VringState(0, 0).pack())) is None
    assert be.vrings[0].enabled and be.errors == 1  # SET_VRING_ENABLE illegal without bit 30


def test_memory_table_messages(be, memfd, efd):
    negotiate(be)
    be.handle(message(R.SET_MEM_TABLE, SetMemTable((LOW, HIGH), ()).pack(), (memfd, memfd)))
    assert be.device.events[-1] == ("memory_changed", 2)
    be.mem.view(0xC0000, 4)[:] = b"high"
    assert os.pread(memfd, 4, 0xC0000) == b"high"
    # ADD overlapping -> refused, table unchanged.
    assert refused(be.handle(message(R.ADD_MEM_REG, AddMemReg(LOW, 0).pack(), (memfd,),
                                     need_reply=True)))
    assert len(be.mem) == 2
    # REM matches gpa + va + size; a stray fd is accepted and closed.
    stray = efd()
    before = open_fds()
    assert be.handle(message(R.REM_MEM_REG, RemMemReg(HIGH).pack(), (stray,),
                             need_reply=True)) == H("26000000") + ACK_OK
    assert len(be.mem) == 1 and be.device.events[-1] == ("memory_changed", 1)
    assert len(open_fds() - before) == 0
    assert refused(be.handle(message(R.REM_MEM_REG, RemMemReg(HIGH).pack(), need_reply=True)))
    assert be.handle(message(R.ADD_MEM_REG, AddMemReg(HIGH, 0).pack(), (memfd,),
                             need_reply=True)) == H("25000000") + ACK_OK
    assert len(be.mem) == 2
    # A region beyond the memfd would SIGBUS on access: refused at map time.
    too_big = MemRegion(0x200000, 0x200000, 0x7F00_0020_0000, 0)
    assert refused(be.handle(message(R.ADD_MEM_REG, AddMemReg(too_big, 0).pack(), (memfd,),
                                     need_reply=True)))


def test_memory_slot_limit(memfd):
    backend = VhostUserBackend(RecordingDevice(), max_mem_slots=1)
    negotiate(backend)
    assert backend.handle(message(R.ADD_MEM_REG, AddMemReg(LOW, 0).pack(), (memfd,),
                                  need_reply=True)) == H("25000000") + ACK_OK
    assert refused(backend.handle(message(R.ADD_MEM_REG, AddMemReg(HIGH, 0).pack(), (memfd,),
                                          need_reply=True)))
    backend.close()


def test_ring_setup_kick_call_err(be, memfd, efd):
    negotiate(be)
    kick = efd()
    # Kick before the ring is placed is refused.
    assert refused(be.handle(message(R.SET_VRING_KICK, VringFile(1, False, 0).pack(), (kick,),
                                     need_reply=True)))
    place_ring(be, memfd)
    vring = be.vrings[1]
    assert (vring.size, vring.desc_gpa, vring.avail_gpa, vring.used_gpa) == (
        16, 0x1000, 0x2000, 0x3000)  # QEMU VAs translated to GPAs
    be.handle(message(R.SET_VRING_KICK, VringFile(1, False, 0).pack(), (kick,)))
    assert vring.started and not vring.ready  # disabled until SET_VRING_ENABLE
    assert os.fstat(vring.kick_fd).st_ino == os.fstat(kick).st_ino
    be.handle(message(R.SET_VRING_ENABLE, VringState(1, 1).pack()))
    assert vring.ready
    # Ring geometry cannot change under a started ring.
    for request in (R.SET_VRING_NUM, R.SET_VRING_BASE):
        assert refused(be.handle(message(request, VringState(1, 32).pack(), need_reply=True)))
    assert vring.size == 16
    # A new kick fd: the device hears about the old one before it is closed.
    old_kick = vring.kick_fd
    be.handle(message(R.SET_VRING_KICK, VringFile(1, False, 0).pack(), (efd(),)))
    assert be.device.names()[-2:] == ["kick_fd_changed", "queue_started"]
    assert vring.kick_fd != old_kick
    # Call: replaced (old closed), then NOFD.
    be.handle(message(R.SET_VRING_CALL, VringFile(1, False, 0).pack(), (efd(),)))
    first_call = vring.call_fd
    be.handle(message(R.SET_VRING_CALL, VringFile(1, False, 0).pack(), (efd(),)))
    with pytest.raises(OSError):
        os.fstat(first_call)
    be.handle(message(R.SET_VRING_CALL, VringFile(1, True, None).pack()))
    assert vring.call_fd is None and be.device.events[-1] == ("call_fd_changed", 1, False)
    be.handle(message(R.SET_VRING_ERR, VringFile(1, False, 0).pack(), (efd(),)))
    assert vring.err_fd is not None


def test_ring_address_checks(be, memfd):
    negotiate(be)
    place_ring(be, memfd)
    va = LOW.userspace_addr
    for addr in (VringAddr(1, 0, va + 0x1000, 0x1234, va + 0x2000, 0),  # VA not in the table
                 VringAddr(1, 0, va + 0x1008, va + 0x3000, va + 0x2000, 0),  # misaligned
                 VringAddr(1, 1, va + 0x1000, va + 0x3000, va + 0x2000, 0)):  # logging
        assert refused(be.handle(message(R.SET_VRING_ADDR, addr.pack(), need_reply=True)))
    assert be.vrings[1].desc_gpa == 0x1000


def test_used_idx_is_read_from_guest_memory_at_set_vring_addr(be, memfd):
    negotiate(be)
    os.pwrite(memfd, U64.pack(0)[:2] + (1234).to_bytes(2, "little"), 0x3000)
    place_ring(be, memfd)
    assert be.vrings[1].used_idx == 1234


def test_get_vring_base_stops_the_ring_after_the_device(be, memfd, efd):
    negotiate(be)
    place_ring(be, memfd)
    vring = be.vrings[1]
    be.handle(message(R.SET_VRING_BASE, VringState(1, 65535).pack()))
    be.handle(message(R.SET_VRING_KICK, VringFile(1, False, 0).pack(), (efd(),)))
    be.handle(message(R.SET_VRING_CALL, VringFile(1, False, 0).pack(), (efd(),)))
    kick, call = vring.kick_fd, vring.call_fd
    reply = be.handle(message(R.GET_VRING_BASE, VringState(1, 0).pack()))
    assert reply == H("0b000000" "05000000" "08000000" "01000000" "ffff0000")
    assert be.device.events[-1] == ("queue_stopping", 1, 65535)
    assert not vring.started and vring.kick_fd is None and vring.call_fd is None
    for fd in (kick, call):
        with pytest.raises(OSError):
            os.fstat(fd)
    # A ring that never started: answered, device not bothered.
    reply = be.handle(message(R.GET_VRING_BASE, VringState(0, 0).pack()))
    assert VRING_STATE.unpack(reply[12:]) == (0, 0)
    assert be.device.names().count("queue_stopping") == 1


def test_reset_device_keeps_memory(be, memfd, efd):
    negotiate(be)
    place_ring(be, memfd)
    be.handle(message(R.SET_VRING_KICK, VringFile(1, False, 0).pack(), (efd(),)))
    be.handle(message(R.RESET_DEVICE))
    assert be.device.events[-1][0] == "queue_stopping"
    vring = be.vrings[1]
    assert (vring.started, vring.size, vring.kick_fd, be.acked_features) == (False, 0, None, 0)
    assert len(be.mem) == 2 and be.owned


def test_no_fd_leaks(memfd, efd):
    fds = [efd() for _ in range(9)]
    before = open_fds()
    backend = VhostUserBackend(RecordingDevice(), num_queues=2)
    negotiate(backend)
    place_ring(backend, memfd)
    for i in range(3):
        backend.handle(message(R.SET_VRING_KICK, VringFile(1, False, 0).pack(), (fds[3 * i],)))
        backend.handle(message(R.SET_VRING_CALL, VringFile(1, False, 0).pack(),
                               (fds[3 * i + 1],)))
        backend.handle(message(R.SET_VRING_ERR, VringFile(0, False, 0).pack(),
                               (fds[3 * i + 2],)))
        backend.handle(message(R.SET_MEM_TABLE, SetMemTable((LOW,), ()).pack(), (memfd,)))
        backend.handle(message(R.SET_VRING_CALL, VringFile(7, False, 0).pack(), (fds[0],)))
    backend.handle(message(R.GET_VRING_BASE, VringState(1, 0).pack()))
    new = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - before}
    # err fd of queue 0; the region's memfd twice: our dup (for workers) + CPython mmap's own.
    assert sorted(new.values()) == ["/memfd:test-guest (deleted)"] * 2 + ["anon_inode:[eventfd]"]
    backend.close()
    assert open_fds() == before


# -- against the front-end over a socketpair -------------------------------------------------
class BackendLoop:
    """The supervisor's loop in miniature: one thread polling the socket and the kick fds."""

    def __init__(self, sock: socket.socket, device: RecordingDevice, **kwargs) -> None:
        self.sock = sock
        self.device = device
        self.backend = VhostUserBackend(device, **kwargs)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                watch: dict[int, Vring | None] = {self.sock.fileno(): None}
                for vring in self.backend.vrings:
                    if vring.kick_fd is not None:
                        watch[vring.kick_fd] = vring
                ready, _, _ = select.select(list(watch), [], [], 1.0)
                for fd in ready:
                    vring = watch[fd]
                    if vring is None:
                        try:
                            msg = recv_message(self.sock)
                        except PeerClosed:
                            return
                        reply = self.backend.handle(msg)
                        if reply is not None:
                            send_message(self.sock, reply)
                        break  # the message may have replaced kick fds: re-poll
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    self.device.process(vring)
        except BaseException as e:  # surfaced by join()
            self.error = e

    def join(self) -> None:
        self.thread.join(5)
        assert not self.thread.is_alive(), "back-end loop did not stop"
        self.backend.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def link():
    made: list[tuple[VhostUserClient, BackendLoop]] = []

    def make(*, start: bool = True, backend_kwargs: dict | None = None, **client_kwargs):
        front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        loop = BackendLoop(back, RecordingDevice(), **(backend_kwargs or {}))
        client = VhostUserClient(front, mem_size=8 << 20, **client_kwargs)
        made.append((client, loop))
        if start:
            client.realize()
            client.start()
        return client, loop

    yield make
    for client, loop in made:
        client.close()
        loop.join()
        loop.sock.close()


CONFIGS = {
    "default": {},
    "set_mem_table": {"protocol_features": PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK},
    "no_reply_ack": {"protocol_features": PROTOCOL_F_MQ | PROTOCOL_F_CONFIGURE_MEM_SLOTS},
    "no_protocol_features": {"protocol_features": 0},
    "no_event_idx_no_indirect": {"features": VIRTIO_F_VERSION_1},
    "queue_size_4": {"queue_size": 4},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_qemu_like_session(link, config):
    client, loop = link(**CONFIGS[config])
    device = loop.device
    backend = loop.backend
    assert client.acked_features & VHOST_USER_F_PROTOCOL_FEATURES
    assert backend.acked_features == client.acked_features
    assert backend.acked_protocol_features == client.protocol_features
    assert device.names().count("memory_changed") == (
        2 if client.protocol_features & PROTOCOL_F_CONFIGURE_MEM_SLOTS else 1)
    assert [e for e in device.events if e[0] == "queue_started"] == [
        ("queue_started", 0), ("queue_started", 1)]
    assert all(v.ready for v in backend.vrings)
    indirect_ok = bool(client.acked_features & VIRTIO_RING_F_INDIRECT_DESC)
    assert backend.vrings[1].event_idx == bool(client.acked_features & VIRTIO_RING_F_EVENT_IDX)
    # One request at a time, alternating direct/indirect, sizes across buffer boundaries.
    for i in range(40):
        payload = [b"in-header-%03d" % i, bytes([i]) * (i * 7 % 50)]
        indirect = indirect_ok and (i % 2 == 0 or client.queue_size < 5)
        head = client.submit(1, payload, [5, 64, 3], indirect=indirect)
        [done] = client.wait(1, timeout=2)
        expected = b"".join(payload)[:72]
        assert (done.head, done.used_len, done.data) == (head, len(expected), expected)
    # Batches: several chains per kick, completions in any number per signal.
    for _ in range(5):
        heads = [client.submit(1, [b"batch-%d" % j], [16], kick=False) for j in range(3)]
        client.kick(1)
        done = client.wait(1, timeout=2, count=3)
        assert sorted(d.head for d in done) == sorted(heads)
    assert device.errors == []
    assert client.stop_queue(1) == 55
    assert backend.errors == 0


def test_hiprio_chain_without_writable_part(link):
    client, _loop = link()
    forget = bytes(48)
    head = client.submit(0, [forget])
    [done] = client.wait(0, timeout=2)
    assert (done.head, done.used_len) == (head, 0)


def test_event_idx_notifications_are_real(link):
    """The guest must be interrupted through the call eventfd (wait() does not poll)."""
    client, _loop = link()
    client.submit(1, [b"x"], [1])
    assert client.wait(1, timeout=2)
    assert client.queues[1].avail_event == client.queues[1].avail_idx  # published by pop_avail
    for i in range(20):
        client.submit(1, [b"y%d" % i], [4])
        assert len(client.wait(1, timeout=2)) == 1


def wait_until(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_get_vring_base_completes_in_flight_requests_first(link):
    client, loop = link()
    for i in range(3):
        client.submit(1, [b"done-%d" % i], [8])
    assert len(client.wait(1, timeout=2, count=3)) == 3
    loop.device.hold = True
    heads = [client.submit(1, [b"held-%d" % i], [8]) for i in range(4)]
    wait_until(lambda: len(loop.device.held[1]) == 4)
    assert client.stop_queue(1) == 7
    # The held chains were pushed before the reply: already in the used ring.
    assert client.queues[1].used_idx == 7
    done = client.wait(1, timeout=0)
    assert [d.head for d in done] == heads and done[0].data == b"held-0"


def test_restart_with_the_old_base_continues(link):
    client, loop = link()
    for i in range(10):
        client.submit(1, [b"a%d" % i], [4])
        client.wait(1, timeout=2)
    assert client.stop_queue(1) == 10
    assert not loop.backend.vrings[1].started
    client.start_queue(1)  # VM resume: SET_VRING_BASE 10, used.idx taken from guest memory
    assert loop.backend.vrings[1].used_idx == 10
    for i in range(5):
        head = client.submit(1, [b"b%d" % i], [4])
        [done] = client.wait(1, timeout=2)
        assert (done.head, done.data) == (head, b"b%d" % i)
    assert client.stop_queue(1) == 15


def test_restart_after_guest_reset_uses_base_0(link):
    client, loop = link()
    for _ in range(6):
        client.submit(1, [b"x"], [1])
    assert len(client.wait(1, timeout=2, count=6)) == 6
    assert client.stop_queue(1) == 6
    client.start_queue(1, reset=True)
    assert (loop.backend.vrings[1].last_avail_idx, loop.backend.vrings[1].used_idx) == (0, 0)
    head = client.submit(1, [b"fresh"], [5])
    assert client.wait(1, timeout=2)[0].data == b"fresh"
    assert client.stop_queue(1) == 1
    assert head in range(client.queue_size)


@pytest.mark.parametrize("mem_slots", [True, False])
def test_device_stop_and_start(link, mem_slots):
    protocol = WANTED_PROTOCOL_FEATURES
    if not mem_slots:
        protocol &= ~PROTOCOL_F_CONFIGURE_MEM_SLOTS
    client, loop = link(protocol_features=protocol)
    client.submit(1, [b"before"], [6])
    client.wait(1, timeout=2)
    memory_updates = loop.device.names().count("memory_changed")
    assert client.stop() == [0, 1]
    assert not any(v.started or v.enabled for v in loop.backend.vrings)
    client.start(reset=False)
    # CONFIGURE_MEM_SLOTS: nothing resent (QEMU sends only the diff); else SET_MEM_TABLE again.
    assert loop.device.names().count("memory_changed") == memory_updates + (0 if mem_slots else 1)
    client.submit(1, [b"after"], [5])
    assert client.wait(1, timeout=2)[0].data == b"after"
    assert client.stop() == [0, 2]


def test_hostile_chains_do_not_break_the_session(link):
    client, loop = link()
    q = client.queues[1]
    d0, d1 = q.take_descs(2)
    q.write_desc(d0, 0xC0000, 8, VRING_DESC_F_NEXT, d1)  # a loop
    q.write_desc(d1, 0xC0000, 8, VRING_DESC_F_NEXT, d0)
    q.track(d0, [d0, d1])
    q.publish(d0)
    (d2,) = q.take_descs(1)
    q.write_desc(d2, 0xA0000, 8, 0, 0)  # in the pc "VGA hole": not guest RAM
    q.track(d2, [d2])
    q.publish(d2)
    client.kick(1, force=True)
    done = client.wait(1, timeout=2, count=2)
    assert [(d.head, d.used_len) for d in done] == [(d0, 0), (d2, 0)]
    assert [type(e).__name__ for e in loop.device.errors] == ["ChainError", "ChainError"]
    client.submit(1, [b"still fine"], [10])
    assert client.wait(1, timeout=2)[0].data == b"still fine"


def test_avail_index_run_ahead_is_reported_not_fatal(link):
    client, loop = link()
    client.queues[1].set_avail_idx(client.queues[1].avail_idx + 500)
    client.kick(1, force=True)
    wait_until(lambda: loop.device.errors)
    assert "ahead" in str(loop.device.errors[0])
    client.sync()  # the control connection still works
    assert client.queue_num == 2


def test_realize_refuses_too_few_queues(link):
    client, _loop = link(start=False, num_queues=3)
    with pytest.raises(FrontendError, match="serves 2 queues"):
        client.realize()
