"""A hostile front-end against the whole daemon (supervisor + workers over the socket).

Inside the virtqueues (bad guest input): random and mutated FUSE requests of every opcode
(random nodeids, fhs, uids, lengths, buffer shapes) on the request and hiprio queues, and
malformed descriptor chains. Every request must be answered with a well-formed reply, or
used with length 0 where FUSE has no reply or the chain has no room for one (a logged
drop); the daemon stays up (a valid GETATTR of the root still works at the end), logs no
traceback, and nothing next to the export changes.

On the vhost-user socket: random and mutated messages after a partial handshake. The daemon
may end the session as virtiofsd does, but cleanly: exit code 0 or 1, no traceback, no
signal.

Runs are seeded: VFSD_HOSTILE_SEED (default: random; the seed is printed and named in every
failure), VFSD_HOSTILE_ITERATIONS guest requests (default 300; one vhost-user session per 50
of them, at least 6). docs/RELIABILITY.md has a long run's figures.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import resource
import select
import shutil
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon.conftest import connect
from tests.daemon_proc import Daemon
from tests.fuzz.frontend_trace import record_session
from tests.fuzz.fuse_input import capture, every_opcode
from vfsd.frontend.fuse_client import (
    HIPRIO_QUEUE,
    REQUEST_QUEUE,
    FuseClient,
    VhostTransport,
    attr,
    build,
    check_reply,
    entry,
    open_fh,
)
from vfsd.frontend.vhost_client import Completion, VhostUserClient
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.transport import TransportError
from vfsd.transport.abi import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VhostUserRequest,
)
from vfsd.transport.codec import encode_request
from vfsd.transport.connection import send_message

SEED = int(os.environ.get("VFSD_HOSTILE_SEED") or random.SystemRandom().randrange(1 << 32))
ITERATIONS = int(os.environ.get("VFSD_HOSTILE_ITERATIONS", "300"))
SESSIONS = max(6, ITERATIONS // 50)
#: Files the daemon writes are capped (it inherits RLIMIT_FSIZE; CPython ignores SIGXFSZ, so
#: WRITE, FALLOCATE and COPY_FILE_RANGE past it fail with EFBIG), and the export is emptied
#: every WIPE_EVERY requests: random lengths must not fill the host's disk. The cap applies
#: to the daemon's shared memory too, hence a smaller inode table than the default 200 MiB.
FILE_LIMIT = 64 << 20
INODE_CAPACITY = 1 << 16
WIPE_EVERY = 100
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
R = VhostUserRequest
_IN, _OUT = 40, 16
_NO_REPLY = frozenset(int(op) for op in abi.NO_REPLY_OPCODES)
_TEMPLATES = [(raw, sizes) for raw, sizes in capture(every_opcode)
              if int.from_bytes(raw[4:8], "little") not in (Opcode.INIT, Opcode.DESTROY)]


def setup_module() -> None:
    print(f"hostile front-end: VFSD_HOSTILE_SEED={SEED} VFSD_HOSTILE_ITERATIONS={ITERATIONS}")


def tree(top: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under `top`: mode, size, and contents (files) or target (symlinks)."""
    out = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = path.lstat()
        data = (os.readlink(path).encode() if path.is_symlink()
                else path.read_bytes() if path.is_file() else b"")
        out[str(path.relative_to(top))] = (st.st_mode, st.st_size, data)
    return out


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for the processes started inside (the test's own is restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def clean_exit(daemon: Daemon, what: str) -> None:
    """Exit code 0 or 1 (not a signal), and no traceback in the log."""
    code = daemon.proc.returncode
    log = daemon.log_path.read_text(errors="replace")  # stop() closed the daemon's handle
    assert code in (0, 1), f"{what}: exit code {code}\n{log[-3000:]}"
    assert "Traceback" not in log, f"{what}:\n{log[log.index('Traceback') - 500:][:4000]}"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An export with a file, a directory and a symlink pointing out of it, and a sibling
    directory that must never change."""
    export, sibling = tmp_path / "export", tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "secret").write_bytes(b"top secret")
    (sibling / "sub").mkdir()
    export.mkdir()
    export.chmod(0o777)
    seed_export(export)
    before = tree(sibling)
    yield export, sibling
    assert tree(sibling) == before, f"seed {SEED}: the export's sibling directory changed"


def empty(export: Path) -> None:
    for child in export.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()


def seed_export(export: Path) -> None:
    (export / "file").write_bytes(b"hello world\n" * 100)
    (export / "dir").mkdir(exist_ok=True)
    (export / "dir" / "inner").write_bytes(b"inner")
    with contextlib.suppress(FileExistsError):
        os.symlink("../sibling/secret", export / "escape")


# -- bad guest input ---------------------------------------------------------------------------
@dataclass
class Sent:
    """What a request must get back."""

    queue: int
    opcode: int  # from the header (-1: none)
    unique: int
    room: int  # writable bytes
    may_drop: bool  # used length 0 is a right answer
    what: str


class HostileGuest:
    """Random and mutated requests and chains, checked as they complete."""

    def __init__(self, client: VhostUserClient, rng: random.Random) -> None:
        self.client = client
        self.rng = rng
        self.uniques = itertools.count(1 << 20, 2)
        self.nodeids = [1]
        self.fhs: list[int] = []
        self.sent: dict[tuple[int, int], Sent] = {}
        self.counts: dict[str, int] = {}
        self.ended_session = False  # an INIT or DESTROY went out: start a valid session
        self.logged_drops = 0  # malformed chains the daemon must log when it drops them

    # choices
    def nodeid(self) -> int:
        rng = self.rng
        return rng.choice([*self.nodeids[-8:], 0, 1, rng.getrandbits(64), rng.getrandbits(33)])

    def fh(self) -> int:
        rng = self.rng
        return rng.choice([*self.fhs[-8:], 0, rng.getrandbits(64),
                           1 << 48 | rng.getrandbits(36)])

    def ident(self) -> int:
        return self.rng.choice([0, 0, 1000, 65534, self.rng.getrandbits(32)])

    def writable(self, sizes: list[int]) -> list[int]:
        rng = self.rng
        return rng.choice([sizes, sizes, sizes, [], [rng.randrange(1, 16)], [16],
                           [rng.randrange(600)], [16, rng.randrange(9000)],
                           [8, 8, rng.randrange(300)]])

    def cut(self, raw: bytes) -> list[bytes]:
        rng = self.rng
        if len(raw) > _IN and rng.random() < 0.6:
            return [raw[:_IN], raw[_IN:]]  # Linux's shape
        cuts = sorted(rng.randrange(len(raw) + 1) for _ in range(rng.randrange(3)))
        pieces = [raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])]
        return [p for p in pieces if p] or [raw]

    # requests
    def mutated(self, raw: bytes) -> bytearray:
        rng = self.rng
        out = bytearray(raw)
        kind = rng.randrange(6)
        if kind == 1:
            for _ in range(rng.randrange(1, 5)):
                out[rng.randrange(len(out))] = rng.getrandbits(8)
        elif kind == 2:
            del out[rng.randrange(len(out) + 1):]
        elif kind == 3:
            out += rng.randbytes(rng.randrange(1, 200))
        elif kind == 4 and len(out) >= _IN + 8:
            out[_IN:_IN + 8] = struct.pack("<Q", self.fh())
        if len(out) >= _IN:
            struct.pack_into("<QQII", out, 8, 0, self.nodeid() if rng.random() < 0.5 else
                             struct.unpack_from("<Q", out, 16)[0], self.ident(), self.ident())
            struct.pack_into("<I", out, 0, len(out) if rng.random() < 0.9 else
                             rng.getrandbits(32))
        return out

    def fuse_request(self) -> tuple[int, bytes, list[int], str]:
        rng = self.rng
        r = rng.random()
        if r < 0.65:
            raw, sizes = rng.choice(_TEMPLATES)
            return REQUEST_QUEUE, bytes(self.mutated(raw)), self.writable(sizes), "template"
        if r < 0.85:
            opcode = rng.choice([rng.randrange(60), rng.getrandbits(32), *map(int, Opcode)])
            body = rng.randbytes(rng.choice([0, 8, 16, 40, 64, rng.randrange(400)]))
            raw = build(opcode, self.nodeid(), body, uid=self.ident(), gid=self.ident())
            return REQUEST_QUEUE, raw, self.writable([16, rng.randrange(300)]), "random"
        if r < 0.97:
            forget = build(Opcode.FORGET, self.nodeid(), abi.FORGET_IN.pack(rng.getrandbits(8)))
            batch = build(Opcode.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(3, 0) + b"".join(
                abi.FORGET_ONE.pack(self.nodeid(), rng.getrandbits(4)) for _ in range(3)))
            interrupt = build(Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(rng.getrandbits(64)))
            raw = bytes(self.mutated(rng.choice([forget, forget, batch, interrupt])))
            return HIPRIO_QUEUE, raw, self.writable([]), "hiprio"
        init = abi.INIT_IN.pack(rng.choice([7, 7, 8, 6, abi.FUSE_INIT_BSWAP_RESERVED]),
                                rng.choice([38, 37, 31, 26, rng.getrandbits(32)]),
                                rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32))
        raw = build(Opcode.INIT, 0, init[:rng.choice([64, 64, 16, 8])])
        return REQUEST_QUEUE, raw, [16, 64], "init"

    def submit_request(self) -> None:
        queue, raw, writable, what = self.fuse_request()
        opcode = int.from_bytes(raw[4:8], "little") if len(raw) >= 8 else -1
        if len(raw) >= 16:
            raw = raw[:8] + struct.pack("<Q", next(self.uniques)) + raw[16:]
        unique = int.from_bytes(raw[8:16], "little") if len(raw) >= 16 else -1
        room = sum(writable)
        may_drop = len(raw) < _IN or room < _OUT or opcode in _NO_REPLY or queue == HIPRIO_QUEUE
        head = self.client.submit(queue, self.cut(raw), writable, self.rng.random() < 0.7,
                                  kick=False)
        self.sent[queue, head] = Sent(queue, opcode, unique, room, may_drop,
                                      f"{what} opcode {opcode}: {raw[:96].hex()} w={writable}")
        self.ended_session |= opcode in (Opcode.INIT, Opcode.DESTROY) and queue == REQUEST_QUEUE
        self.counts[what] = self.counts.get(what, 0) + 1

    def submit_chain(self) -> None:
        """A malformed chain (loops, bad addresses, bad indirect tables, ...) around a valid
        header, so whatever still reads it sees a real request."""
        rng, q, ram = self.rng, self.client.queues[REQUEST_QUEUE], self.client.ram
        raw, _sizes = rng.choice(_TEMPLATES)
        buf = ram.alloc(len(raw))
        ram.write(buf, raw)
        out = ram.alloc(4096)
        table = ram.alloc(64, 16)
        far = rng.choice([0xFFFF_FFFF_0000, 0xA0000 - 8, ram.size - 4, 1 << 63])
        entries = {
            "outside": [(far, 64, 0, None)],
            "loop": [(buf, len(raw), 0, 1), (out, 120, WRITE, 0)],
            "self-loop": [(buf, len(raw), 0, 0)],
            "readable after writable": [(buf, 40, 0, 1), (out, 16, WRITE, 2),
                                        (buf + 40, len(raw) - 40, 0, None)],
            "over 4 GiB": [(buf, 0xFFFF_FFFF, 0, 1), (buf, 0xFFFF_FFFF, 0, None)],
            "writable outside": [(buf, len(raw), 0, 1), (far, 16, WRITE, None)],
            "indirect length": [(table, rng.choice([0, 8, 24, 1 << 20]), INDIRECT, None)],
            "indirect and next": [(table, 32, INDIRECT, 1), (out, 16, WRITE, None)],
            "indirect outside": [(far & ~15, 32, INDIRECT, None)],
        }
        name = rng.choice(sorted(entries))
        descs = entries[name]
        inner = [(buf, len(raw), NEXT, 1), (table, 32, INDIRECT, 0)]  # nested, then a loop
        view = ram.view(table, 64)
        for i, (addr, length, flags, nxt) in enumerate(inner):
            struct.pack_into("<QIHH", view, 16 * i, addr, length, flags, nxt)
        ids = q.take_descs(len(descs))
        for i, (addr, length, flags, nxt) in enumerate(descs):
            q.write_desc(ids[i], addr, length, flags | (NEXT if nxt is not None else 0),
                         ids[nxt] if nxt is not None else 0)
        q.track(ids[0], ids, [buf, out, table])
        q.publish(ids[0])
        # FORGET & co. are consumed without a walk (no reply to write): nothing to log.
        self.logged_drops += int.from_bytes(raw[4:8], "little") not in _NO_REPLY
        self.sent[REQUEST_QUEUE, ids[0]] = Sent(REQUEST_QUEUE, -1, -1, 0, True, f"chain {name}")
        self.counts["chain"] = self.counts.get("chain", 0) + 1

    # answers
    def check(self, queue: int, done: Completion) -> None:
        sent = self.sent.pop((queue, done.head))
        where = f"seed {SEED}: {sent.what}"
        if sent.queue == HIPRIO_QUEUE:
            assert done.used_len == 0, f"{where}: hiprio answered {done.used_len} bytes"
            return
        if done.used_len == 0:
            assert sent.may_drop, f"{where}: dropped, with room for a reply"
            return
        assert done.used_len <= sent.room, f"{where}: {done.used_len} bytes into {sent.room}"
        if sent.room < _OUT:
            return  # no room for a reply: what was written cannot be one
        problem = check_reply(done.data, done.used_len, sent.unique, error=None)
        assert problem is None, f"{where}: {problem}"
        self.learn(sent, done)

    def learn(self, sent: Sent, done: Completion) -> None:
        """Keep nodeids and fhs the daemon hands out, for later requests to use."""
        error = abi.OUT_HEADER.unpack_from(done.data)[1]
        body = done.data[_OUT:]
        if error or len(body) < 8:
            return
        if len(body) in (abi.ENTRY_OUT.size, abi.ENTRY_OUT.size + abi.OPEN_OUT.size):
            self.nodeids.append(struct.unpack_from("<Q", body)[0])
        if len(body) == abi.ENTRY_OUT.size + abi.OPEN_OUT.size:
            self.fhs.append(struct.unpack_from("<Q", body, abi.ENTRY_OUT.size)[0])
        elif len(body) == abi.OPEN_OUT.size and sent.opcode in (Opcode.OPEN, Opcode.OPENDIR):
            self.fhs.append(struct.unpack_from("<Q", body)[0])

    def batch(self, size: int) -> None:
        for _ in range(size):
            if self.rng.random() < 0.1:
                self.submit_chain()
            else:
                self.submit_request()
        for queue in (HIPRIO_QUEUE, REQUEST_QUEUE):
            self.client.kick(queue, force=True)
        self.collect(timeout=15)
        if self.ended_session:
            valid_session(self.client)
            self.ended_session = False

    def collect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.sent and time.monotonic() < deadline:
            waiting = {queue for queue, _head in self.sent}
            for queue in waiting:
                for done in self.client.wait(queue, timeout=0.05, count=1):
                    self.check(queue, done)
        if self.sent:
            self.interrupt_waiting_locks()
        left = [s.what for s in self.sent.values()]
        assert not left, f"seed {SEED}: never answered: {left}"

    def interrupt_waiting_locks(self) -> None:
        """A SETLKW on a lock another owner holds waits, as it should; INTERRUPT ends it
        (EINTR). Anything else still waiting stays unanswered and fails the run."""
        for sent in list(self.sent.values()):
            if sent.opcode == Opcode.SETLKW:
                interrupt = build(Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(sent.unique))
                head = self.client.submit(HIPRIO_QUEUE, [interrupt])
                self.sent[HIPRIO_QUEUE, head] = Sent(HIPRIO_QUEUE, Opcode.INTERRUPT, -1, 0, True,
                                                     "interrupt")
        deadline = time.monotonic() + 10
        while self.sent and time.monotonic() < deadline:
            for queue in {queue for queue, _head in self.sent}:
                for done in self.client.wait(queue, timeout=0.05, count=1):
                    self.check(queue, done)


def valid_session(client: VhostUserClient) -> FuseClient:
    fuse = FuseClient(VhostTransport(client))
    assert fuse.init().error == 0
    return fuse


def test_random_guest_requests_are_answered_and_stay_in_the_export(world, tmp_path):
    export, _sibling = world
    rng = random.Random(SEED)
    conf = tmp_path / "vfsd.yaml"
    conf.write_text(f"workers: 2\nlog_level: debug\ninode_capacity: {INODE_CAPACITY}\n")
    with file_size_limit(FILE_LIMIT):
        daemon = Daemon(tmp_path, export, extra=["--config", str(conf)])
    client = None
    try:
        client = connect(daemon, num_queues=2)
        valid_session(client)
        guest = HostileGuest(client, rng)
        done = 0
        while done < ITERATIONS:
            size = rng.randrange(1, 9)
            guest.batch(size)
            done += size
            if done // WIPE_EVERY != (done - size) // WIPE_EVERY:
                empty(export)
                seed_export(export)
            assert daemon.proc.poll() is None, f"seed {SEED}: the daemon exited"
        print(f"hostile front-end: {done} requests {guest.counts}")
        fuse = valid_session(client)  # the random stream may have ended the session
        assert attr(fuse.getattr(1))[9] & 0o170000 == 0o040000, f"seed {SEED}"
        drops = len(re.findall(r"dropping (chain|request)|cannot answer head", daemon.log()))
        assert drops >= guest.logged_drops, f"seed {SEED}: {drops} drops logged"
    finally:
        if client is not None:
            client.close()
        daemon.stop()
    clean_exit(daemon, f"seed {SEED}")


def test_a_broken_avail_index_pauses_the_queue_until_the_guest_resets_it(world, tmp_path):
    export, _sibling = world
    daemon = Daemon(tmp_path, export, workers=1)
    client = None
    try:
        client = connect(daemon, num_queues=2)
        fuse = valid_session(client)
        q = client.queues[REQUEST_QUEUE]
        q.set_avail_idx(q.avail_idx + client.queue_size + 5)  # runs ahead of the ring
        client.kick(REQUEST_QUEUE, force=True)
        deadline = time.monotonic() + 10
        while "queue 1 broken" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert daemon.proc.poll() is None
        client.stop_queue(REQUEST_QUEUE)
        client.start_queue(REQUEST_QUEUE, reset=True)
        assert attr(fuse.getattr(1))[9] & 0o170000 == 0o040000
    finally:
        if client is not None:
            client.close()
        daemon.stop()
    clean_exit(daemon, "broken avail index")
    assert "queue 1 broken" in daemon.log_path.read_text(), "the broken ring was not logged"


# -- bugs the hostile front-end found (S1 in the worker, H2-H4 in the supervisor), fixed -----
def _opened_file(fuse: FuseClient) -> tuple[int, int]:
    nodeid, _ = entry(fuse.lookup(1, b"file"))
    fh, _ = open_fh(fuse.open(nodeid))
    return nodeid, fh


def test_read_of_size_zero_without_room_for_a_reply(world, tmp_path):
    export, _sibling = world
    daemon = Daemon(tmp_path, export, workers=1)
    client = None
    try:
        client = connect(daemon, num_queues=2)
        fuse = valid_session(client)
        nodeid, fh = _opened_file(fuse)
        read0 = build(Opcode.READ, nodeid, abi.READ_IN.pack(fh, 0, 0, 0, 0, 0, 0), unique=90)
        for writable in ([], [8]):
            client.submit(REQUEST_QUEUE, [read0[:_IN], read0[_IN:]], writable)
            [done] = client.wait(REQUEST_QUEUE, timeout=5)
            assert done.used_len <= sum(writable)
        assert attr(fuse.getattr(1))
    finally:
        if client is not None:
            client.close()
        daemon.stop()
    clean_exit(daemon, "READ of size 0")


def test_init_with_a_broken_reply_buffer_is_dropped(world, tmp_path):
    export, _sibling = world
    daemon = Daemon(tmp_path, export, workers=1)
    client = None
    try:
        client = connect(daemon, num_queues=2)
        valid_session(client)
        init = build(Opcode.INIT, 0, abi.INIT_IN.pack(7, 38, 0, 0, 0), unique=92)
        q, ram = client.queues[REQUEST_QUEUE], client.ram
        buf = ram.alloc(len(init))
        ram.write(buf, init)
        ids = q.take_descs(2)
        q.write_desc(ids[0], buf, len(init), NEXT, ids[1])
        q.write_desc(ids[1], 0xFFFF_FFFF_0000, 80, WRITE, 0)
        q.track(ids[0], ids, [buf])
        q.publish(ids[0])
        client.kick(REQUEST_QUEUE, force=True)
        assert [d.used_len for d in client.wait(REQUEST_QUEUE, timeout=5)] == [0]
        assert valid_session(client)
    finally:
        if client is not None:
            client.close()
        daemon.stop()
    clean_exit(daemon, "INIT with a broken reply buffer")


# -- a broken vhost-user stream ----------------------------------------------------------------
_FRAMES = [frame for kind, frame, _n in record_session() if kind == "frame"]


def _handshake_steps(client: VhostUserClient) -> list[Callable[[], object]]:
    """QEMU's start-up, in the steps a partial handshake is cut between."""
    return [client.realize, client.start, lambda: valid_session(client)]


def _fds(rng: random.Random) -> list[int]:
    """Up to 8 eventfds or memfds (9 or more: test_a_message_with_more_than_eight_fds)."""
    fds = []
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 8])):
        if rng.random() < 0.5:
            fds.append(os.eventfd(0, os.EFD_CLOEXEC))
        else:
            fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
            os.ftruncate(fd, rng.choice([0, 4096, 1 << 20]))
            fds.append(fd)
    return fds


def _message(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.5:  # a real message, mutated
        frame = bytearray(rng.choice(_FRAMES))
        for _ in range(rng.randrange(1, 4)):
            frame[rng.randrange(len(frame))] = rng.getrandbits(8)
        if rng.random() < 0.3:
            frame = frame[:rng.randrange(12, len(frame) + 1)] + rng.randbytes(rng.randrange(9))
            struct.pack_into("<I", frame, 8, len(frame) - 12)
        return bytes(frame)
    if r < 0.9:  # any request id, a plausible payload
        request = rng.choice([*map(int, R), rng.randrange(64), rng.getrandbits(32)])
        payload = rng.randbytes(rng.choice([0, 8, 8, 40, 40, 72, rng.randrange(300)]))
        return encode_request(request, payload, need_reply=rng.random() < 0.5)
    frame = rng.randbytes(rng.randrange(1, 40))  # noise: usually a framing error
    return frame


def _drain(sock: socket.socket, until_eof: float = 0.0) -> None:
    """Read the replies that came back, so the daemon never blocks on a full socket; with
    `until_eof`, keep reading (that long at most) until the daemon hangs up."""
    deadline = time.monotonic() + until_eof
    while select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
        try:
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                return
        except BlockingIOError:
            continue
        except OSError:
            return


def test_random_vhost_user_messages_end_the_session_cleanly(world, tmp_path):
    export, _sibling = world
    rng = random.Random(SEED)
    for session in range(SESSIONS):
        workdir = tmp_path / f"s{session}"
        workdir.mkdir()
        daemon = Daemon(workdir, export, workers=1)
        client = VhostUserClient.connect(daemon.socket_path, num_queues=2)
        sent = []
        try:
            for step in _handshake_steps(client)[:rng.randrange(4)]:
                step()
            for _ in range(rng.randrange(1, 40)):
                frame, fds = _message(rng), _fds(rng)
                sent.append(frame[:24].hex())
                try:
                    send_message(client.sock, frame, fds)
                except OSError:
                    break  # the daemon hung up: allowed
                finally:
                    for fd in fds:
                        os.close(fd)
                _drain(client.sock)
            with contextlib.suppress(OSError):
                if rng.random() < 0.5:  # hang up inside a message
                    client.sock.send(encode_request(R.GET_FEATURES)[:rng.randrange(1, 12)])
                # Hang up after reading every reply (closing with replies on the way:
                # test_a_front_end_that_hangs_up_without_reading_its_replies).
                client.sock.shutdown(socket.SHUT_WR)
                _drain(client.sock, until_eof=15)
        finally:
            client.close()
        try:
            daemon.wait(15)
        finally:
            daemon.stop()
        clean_exit(daemon, f"seed {SEED}, session {session}, sent {sent}")


def test_a_front_end_that_hangs_up_without_reading_its_replies(world, tmp_path):
    export, _sibling = world
    daemon = Daemon(tmp_path, export, workers=1)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket_path)
        sock.sendall(encode_request(R.GET_FEATURES) * 50)
        sock.close()
        daemon.wait(15)
    finally:
        daemon.stop()
    clean_exit(daemon, "hang-up with unread replies")


def test_a_message_with_more_than_eight_fds(world, tmp_path):
    export, _sibling = world
    daemon = Daemon(tmp_path, export, workers=1)
    client = VhostUserClient.connect(daemon.socket_path, num_queues=2)
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(9)]
    try:
        send_message(client.sock, encode_request(R.SET_OWNER), fds)
        with contextlib.suppress(OSError, TransportError):
            client.sync()  # served, or the session ended: both fine if the exit is clean
    finally:
        for fd in fds:
            os.close(fd)
        client.close()
        daemon.wait(15)
        daemon.stop()
    clean_exit(daemon, "9 fds on one message")
