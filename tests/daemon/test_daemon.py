"""The whole daemon (supervisor + worker processes) over its vhost-user socket, no QEMU.

Every test runs with 1 and with 4 workers (the `session` fixture), so routing, fh ownership
and the shared inode table are exercised across processes.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.daemon.conftest import Session, connect
from tests.daemon_proc import REPO, Daemon
from tests.unit.fusereq import FuseClient, attr, build, entry, open_fh, parse_dirents
from vfsd.dispatch.fh import fh_owner
from vfsd.frontend.fuse_client import REQUEST_QUEUE, VhostTransport
from vfsd.frontend.vhost_client import VhostUserClient
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.transport.abi import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VhostUserRequest

HIPRIO = 0
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} [DIWEC] \[")  # vfsd.logs.TextFormatter


def ok(reply):
    assert reply.error == 0, f"errno {reply.error} ({os.strerror(reply.error)})"
    return reply


def test_file_lifecycle(session):
    fuse, export = session.fuse, session.daemon.export
    reply = ok(fuse.create(1, b"f.txt", flags=os.O_RDWR, mode=0o640))
    nodeid, _ = entry(reply)
    fh, _ = open_fh(reply, 128)
    assert ok(fuse.write(nodeid, fh, 0, b"hello world")).body[:4] == struct.pack("<I", 11)
    assert ok(fuse.read(nodeid, fh, 6, 100)).body == b"world"
    ok(fuse.release(nodeid, fh))
    assert (export / "f.txt").read_bytes() == b"hello world"
    assert (export / "f.txt").stat().st_mode & 0o777 == 0o640
    ok(fuse.setattr(nodeid, abi.FATTR_SIZE, size=5))
    assert (export / "f.txt").read_bytes() == b"hello"
    assert attr(ok(fuse.getattr(nodeid)))[1] == 5
    ok(fuse.unlink(1, b"f.txt"))
    assert not (export / "f.txt").exists()
    assert fuse.lookup(1, b"f.txt").error in (0, errno.ENOENT)


def test_many_opens_spread_over_workers(session):
    """OPEN goes to the least-loaded worker; every fh-carrying op must reach its owner."""
    fuse, export = session.fuse, session.daemon.export
    for i in range(16):
        (export / f"n{i}").write_bytes(bytes([i]) * 100)
    handles = []
    for i in range(16):
        nodeid, _ = entry(ok(fuse.lookup(1, f"n{i}".encode())))
        fh, _ = open_fh(ok(fuse.open(nodeid, os.O_RDWR)))
        handles.append((i, nodeid, fh))
    owners = {fh_owner(fh) for _, _, fh in handles}
    assert all(0 <= o < 4 for o in owners)
    for i, nodeid, fh in handles:
        assert ok(fuse.read(nodeid, fh, 0, 10)).body == bytes([i]) * 10
        ok(fuse.write(nodeid, fh, 100, b"tail"))
        ok(fuse.release(nodeid, fh))
        assert (export / f"n{i}").read_bytes() == bytes([i]) * 100 + b"tail"


def test_directories_rename_links(session):
    fuse, export = session.fuse, session.daemon.export
    d1, _ = entry(ok(fuse.mkdir(1, b"d1")))
    d2, _ = entry(ok(fuse.mkdir(1, b"d2")))
    f, _ = entry(ok(fuse.mknod(d1, b"file", 0o100644)))
    ok(fuse.rename(d1, b"file", d2, b"moved"))
    assert (export / "d2" / "moved").is_file()
    ok(fuse.link(f, 1, b"hardlink"))
    assert os.stat(export / "hardlink").st_ino == os.stat(export / "d2" / "moved").st_ino
    ok(fuse.symlink(1, b"sym", b"d2/moved"))
    assert os.readlink(export / "sym") == "d2/moved"
    assert fuse.rmdir(1, b"d2").error == errno.ENOTEMPTY
    ok(fuse.unlink(d2, b"moved"))
    ok(fuse.rmdir(1, b"d2"))
    assert fuse.lookup(1, b"d2").error in (0, errno.ENOENT)


def test_readdir_lists_everything_once(session):
    fuse, export = session.fuse, session.daemon.export
    (export / "dir").mkdir()
    for i in range(500):
        (export / "dir" / f"entry-{i:03d}").touch()
    nodeid, _ = entry(ok(fuse.lookup(1, b"dir")))
    fh, _ = open_fh(ok(fuse.opendir(nodeid)))
    names, offset = [], 0
    while True:
        body = ok(fuse.readdir(nodeid, fh, offset)).body
        if not body:
            break
        dirents = parse_dirents(body)
        names += [d.name for d in dirents]
        offset = dirents[-1].off
    ok(fuse.release(nodeid, fh, Opcode.RELEASEDIR))
    assert sorted(n for n in names if n not in (b".", b"..")) == sorted(
        f"entry-{i:03d}".encode() for i in range(500))


def test_forget_on_hiprio_releases_the_inode(session):
    fuse, export = session.fuse, session.daemon.export
    (export / "x").write_text("x")
    nodeid, _ = entry(ok(fuse.lookup(1, b"x")))
    ok(fuse.getattr(nodeid))
    forget = build(Opcode.FORGET, nodeid, abi.FORGET_IN.pack(1), unique=0)
    session.client.submit(HIPRIO, [forget], [])
    done = session.client.wait(HIPRIO, timeout=5)
    assert len(done) == 1 and done[0].used_len == 0
    # The nodeid is gone from the shared table: every worker refuses it now.
    for _ in range(4):
        assert fuse.getattr(nodeid).error != 0
    # A new lookup gets a fresh nodeid.
    assert entry(ok(fuse.lookup(1, b"x")))[0] != nodeid


def test_batch_forget(session):
    fuse, export = session.fuse, session.daemon.export
    ids = []
    for i in range(5):
        (export / f"b{i}").touch()
        ids.append(entry(ok(fuse.lookup(1, f"b{i}".encode())))[0])
    body = abi.BATCH_FORGET_IN.pack(5, 0) + b"".join(abi.FORGET_ONE.pack(n, 1) for n in ids)
    session.client.submit(HIPRIO, [build(Opcode.BATCH_FORGET, 0, body, unique=0)], [])
    assert len(session.client.wait(HIPRIO, timeout=5)) == 1
    assert all(fuse.getattr(n).error != 0 for n in ids)


def test_names_with_slash_and_dotdot_are_refused(session):
    fuse, export = session.fuse, session.daemon.export
    for name in (b"a/b", b"..", b".", b"", b"../../etc/passwd"):
        assert fuse.mknod(1, name, 0o100644).error in (errno.EINVAL, errno.EPERM, errno.EEXIST,
                                                        errno.ENOENT), name
    assert fuse.lookup(1, b"../" * 8 + b"etc").error in (errno.EINVAL, errno.ENOENT)
    assert fuse.mknod(1, b"x" * 256, 0o100644).error == errno.ENAMETOOLONG
    assert sorted(os.listdir(export)) == []


def test_symlink_escape_is_not_followed(session):
    fuse, export = session.fuse, session.daemon.export
    os.symlink("/etc", export / "out")
    nodeid, _ = entry(ok(fuse.lookup(1, b"out")))
    assert fuse.lookup(nodeid, b"passwd").error in (errno.ENOTDIR, errno.ENOENT, errno.ELOOP,
                                                    errno.EBADF, errno.EINVAL)
    assert fuse.create(nodeid, b"pwned").error != 0
    assert not os.path.exists("/etc/pwned")


def test_truncated_and_oversized_requests(session):
    fuse, client = session.fuse, session.client
    # in.len larger than the readable part
    req = build(Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0), length=4096)
    client.submit(REQUEST_QUEUE, [req], [16 + 104])
    (done,) = client.wait(REQUEST_QUEUE, timeout=5)
    assert done.used_len == 16 and struct.unpack_from("<i", done.data, 4)[0] == -errno.EINVAL
    # A request shorter than the in_header: dropped (used len 0), the queue keeps working.
    client.submit(REQUEST_QUEUE, [b"\x01" * 20], [16])
    (done,) = client.wait(REQUEST_QUEUE, timeout=5)
    assert done.used_len == 0
    # WRITE whose data is missing
    ok(fuse.getattr(1))


def test_unknown_opcode_is_enosys(session):
    assert session.fuse.call(999, 1).error == errno.ENOSYS
    assert session.fuse.call(Opcode.BMAP, 1, bytes(16)).error == errno.ENOSYS


def test_stale_fh_is_ebadf(session):
    fuse = session.fuse
    assert fuse.read(1, (1 << 48) | 12345, 0, 10).error == errno.EBADF  # owner 0, unknown fh
    assert fuse.read(1, (200 << 48) | 1, 0, 10).error == errno.EBADF  # no such worker
    assert fuse.read(1, 77, 0, 10).error == errno.EBADF  # no owner bits at all


def _raw_chain(client, queue, descs):
    """Publish a chain of raw descriptors [(addr, len, flags, next_index_in_list|None)]."""
    q = client.queues[queue]
    ids = q.take_descs(len(descs))
    for i, (addr, length, flags, nxt) in enumerate(descs):
        q.write_desc(ids[i], addr, length, flags | (VRING_DESC_F_NEXT if nxt is not None else 0),
                     ids[nxt] if nxt is not None else 0)
    q.track(ids[0], ids)
    q.publish(ids[0])
    client.kick(queue, force=True)
    return ids[0]


def test_hostile_chains_are_dropped_and_the_queue_keeps_working(session):
    client, ram = session.client, session.client.ram
    buf = ram.alloc(4096)
    ram.write(buf, build(Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0)))
    out = ram.alloc(256)
    cases = [
        [(0xFFFF_FFFF_0000, 56, 0, None)],  # address outside guest memory
        [(buf, 56, 0, 1), (out, 120, VRING_DESC_F_WRITE, 0)],  # loop: desc 1 -> desc 0
        [(buf, 56, 0, 0)],  # self loop
        [(buf, 40, 0, 1), (out, 16, VRING_DESC_F_WRITE, 2), (buf + 40, 16, 0, None)],  # R after W
        [(buf, 0xFFFF_FFFF, 0, 1), (buf, 0xFFFF_FFFF, 0, None)],  # > 2^32 total
    ]
    for descs in cases:
        _raw_chain(client, REQUEST_QUEUE, descs)
        done = client.wait(REQUEST_QUEUE, timeout=5)
        assert len(done) == 1 and done[0].used_len == 0, descs
    _raw_chain(client, HIPRIO, [(0xDEAD_0000_0000, 48, 0, None)])
    assert len(client.wait(HIPRIO, timeout=5)) == 1
    ok(session.fuse.getattr(1))
    assert session.daemon.proc.poll() is None


def test_malformed_vhost_user_messages_do_not_kill_the_daemon(session):
    client = session.client
    # Wrong payload size for a u64 message, with NEED_REPLY: a failure ack.
    body = client.request(VhostUserRequest.SET_FEATURES, b"\x00" * 3, need_reply=True,
                          reply_size=8)
    assert struct.unpack("<Q", body)[0] != 0
    # Unknown request id, with NEED_REPLY.
    body = client.request(99, b"", need_reply=True, reply_size=8)
    assert struct.unpack("<Q", body)[0] != 0
    # Vring index out of range.
    body = client.request(VhostUserRequest.SET_VRING_NUM, struct.pack("<II", 200, 128),
                          need_reply=True, reply_size=8)
    assert struct.unpack("<Q", body)[0] != 0
    client.sync()
    ok(session.fuse.getattr(1))


def test_vring_stop_and_resume_keeps_the_session(session):
    fuse, client, export = session.fuse, session.client, session.daemon.export
    (export / "keep").write_text("kept")
    nodeid, _ = entry(ok(fuse.lookup(1, b"keep")))
    fh, _ = open_fh(ok(fuse.open(nodeid)))
    bases = client.stop()  # VM pause: GET_VRING_BASE on every queue
    assert bases[REQUEST_QUEUE] == client.queues[REQUEST_QUEUE].avail_idx
    client.start(reset=False)  # resume at the same index
    assert ok(fuse.read(nodeid, fh, 0, 100)).body == b"kept"


def test_guest_reset_and_new_init_starts_a_new_session(session):
    fuse, client, export = session.fuse, session.client, session.daemon.export
    (export / "y").write_text("y")
    nodeid, _ = entry(ok(fuse.lookup(1, b"y")))
    client.stop()
    client.start(reset=True)  # driver reload: rings from index 0
    ok(fuse.init())  # a new session: old nodeids are gone
    assert fuse.getattr(nodeid).error != 0
    assert entry(ok(fuse.lookup(1, b"y")))[0] > 1


def test_destroy_then_disconnect_exits_zero(session):
    ok(session.fuse.call(Opcode.DESTROY, 0, out=0))
    session.client.close()
    assert session.daemon.wait(10) == 0
    assert "front-end disconnected" in session.daemon.log()


def test_killed_worker_is_replaced_and_service_continues(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "f").write_text("data")
    with Daemon(tmp_path, export, workers=2) as daemon:
        client = connect(daemon, num_queues=2)
        s = Session(daemon, client)
        ok(s.fuse.init())
        nodeid, _ = entry(ok(s.fuse.lookup(1, b"f")))
        pids = _worker_pids(daemon)
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(_worker_pids(daemon)) - set(pids)) < 1:
            time.sleep(0.05)
        assert len(set(_worker_pids(daemon)) - set(pids)) == 1, daemon.log()
        # The inode table survived: the nodeid still works on every worker.
        for _ in range(6):
            ok(s.fuse.getattr(nodeid))
        assert "killed by SIGKILL" in daemon.log()
        client.close()
        assert daemon.wait(10) == 0


def _worker_pids(daemon):
    out = []
    for line in daemon.log().splitlines():
        if "started pid=" in line and "worker" in line:
            out.append(int(line.split("pid=")[1].split()[0]))
    return [p for p in out if _alive(p)]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("problem", "message"), [
    ("missing-dir", "does not exist"),
    ("socket-in-use", "is in use"),
    ("no-file-handles", "no file-handle support"),
    ("no-socket", "give --socket-path"),
])
def test_startup_errors_are_one_line(tmp_path, problem, message):
    export = tmp_path / "export"
    sock = tmp_path / "s.sock"
    args = ["--socket-path", str(sock), "--shared-dir", str(export)]
    if problem != "missing-dir":
        export.mkdir()
    if problem == "socket-in-use":
        holder = socket.socket(socket.AF_UNIX)
        holder.bind(str(sock))
        holder.listen(1)
    elif problem == "no-file-handles":
        args[-1] = "/proc"  # procfs has no export operations
    elif problem == "no-socket":
        args = args[2:]
    proc = subprocess.run([sys.executable, "-m", "vfsd", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=30)
    assert proc.returncode != 0
    # Log lines may come first (the device-node warning on a dev mount); the error is one line.
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("vfsd: "), proc.stderr
    assert message in lines[0]
    if problem == "socket-in-use":
        holder.close()


def test_listening_fd_from_the_caller(tmp_path):
    """--fd: a launcher (libvirt, systemd) hands vfsd an already-listening socket."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "via-fd").write_text("ok")
    path = str(tmp_path / "passed.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    log = open(tmp_path / "vfsd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "vfsd", "--fd", str(listener.fileno()),
                             "--shared-dir", str(export), "--workers", "2",
                             "--metrics-listen", "127.0.0.1:0"],
                            pass_fds=[listener.fileno()], stdout=log, stderr=log, cwd=REPO)
    listener.close()
    try:
        client = VhostUserClient.connect(path, num_queues=2)
        client.realize()
        client.start()
        fuse = Session(None, client).fuse
        ok(fuse.init())
        nodeid, _ = entry(ok(fuse.lookup(1, b"via-fd")))
        fh, _ = open_fh(ok(fuse.open(nodeid)))
        assert ok(fuse.read(nodeid, fh, 0, 10)).body == b"ok"
        client.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_second_request_queue(tmp_path):
    """num-request-queues > 1: a request on queue 2 is served like one on queue 1."""
    export = tmp_path / "export"
    export.mkdir()
    with Daemon(tmp_path, export, workers=2) as daemon:
        client = connect(daemon, num_queues=3)
        fuse1 = Session(daemon, client).fuse
        ok(fuse1.init())
        fuse2 = FuseClient(VhostTransport(client, queue=2))
        assert attr(ok(fuse2.getattr(1)))[0] == os.stat(export).st_ino
        ok(fuse2.mkdir(1, b"from-queue-2"))
        assert (export / "from-queue-2").is_dir()
        client.close()
        assert daemon.wait(10) == 0
