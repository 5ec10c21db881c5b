"""FUSE requests through `FuseServer.handle` on the real passthrough file system, over a
temporary export: decoding and everything it feeds (names, flags, modes, offsets, xattrs,
locks) as a worker runs them.

Input: see fuse_input.py. Each input is one session on a fresh inode table; to let a
sequence refer to what it created, a header nodeid 2..15 means the (n-2)th nodeid this
input's replies returned, and an fh field below 16 the nth fh (opens, creates).

A crash is an exception the server's catch-all had to log, a malformed answer, a request
left waiting (SETLKW is cancelled after each input and must then answer), credentials or
umask not restored after a request, or any change to a sibling directory of the export.
Guard rails for the host: files are capped at 16 MiB (RLIMIT_FSIZE, so WRITE, FALLOCATE and
COPY_FILE_RANGE get EFBIG), and the export is emptied every 1024 inputs. The directories live
in $TMPDIR/vfsd-fuzz-PID; libFuzzer exits without running Python's atexit, so each run
removes those of processes that are gone.
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fuzz import fuse_input
from tests.fuzz.harness import Broken
from vfsd.frontend.fuse_client import FuseClient
from vfsd.fs.inode_table import InodeTable
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.fuse.options import FsOptions
from workers.passthrough.fs import PassthroughFs
from workers.server import FuseServer

MAX_LEN = 4096
_FILE_LIMIT = 16 << 20
_WIPE_EVERY = 1024
_U64 = struct.Struct("<Q")
_ENTRY_OPS = {Opcode.LOOKUP, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.LINK,
              Opcode.CREATE, Opcode.TMPFILE}
_FH_AT = {**dict.fromkeys(abi.FH_OPCODES, (0,)), Opcode.GETATTR: (8,), Opcode.SETATTR: (8,),
          Opcode.COPY_FILE_RANGE: (0, 24)}
_NODEID_AT = {Opcode.LINK: (0,), Opcode.RENAME: (0,), Opcode.RENAME2: (0,),
              Opcode.COPY_FILE_RANGE: (16,)}


class _State:
    root: Path
    export: Path
    outside: Path
    snapshot: dict[str, tuple[int, int, bytes]]
    table: InodeTable
    fs: PassthroughFs
    options: FsOptions
    runs = 0


_s = _State()
_bugs = fuse_input.LoggedBugs()


def _tree(top: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under `top`: mode, size and contents (files) or target (links)."""
    out = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = path.lstat()
        data = (os.readlink(path).encode() if path.is_symlink()
                else path.read_bytes() if path.is_file() else b"")
        out[str(path.relative_to(top))] = (st.st_mode, st.st_size, data)
    return out


def prepare() -> None:
    fuse_input.watch("vfsd.worker.server", _bugs)
    # Writes past the cap fail with EFBIG instead of killing the process with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_LIMIT, _FILE_LIMIT))
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob("vfsd-fuzz-*"):
        pid = old.name.removeprefix("vfsd-fuzz-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    _s.root = tmp / f"vfsd-fuzz-{os.getpid()}"
    shutil.rmtree(_s.root, ignore_errors=True)
    _s.root.mkdir()
    atexit.register(shutil.rmtree, _s.root, True)  # when Python exits normally (tests)
    _s.export = _s.root / "export"
    _s.outside = _s.root / "outside"
    _s.export.mkdir()
    _s.export.chmod(0o777)  # the seeds' caller is uid 1000
    _s.outside.mkdir()
    (_s.outside / "secret").write_bytes(b"top secret")
    os.symlink("../outside/secret", _s.export / "escape")
    _s.snapshot = _tree(_s.outside)
    _s.table = InodeTable.create(4096)
    _s.options = FsOptions(shared_dir=str(_s.export), xattr=True, security_label=True)
    _s.fs = PassthroughFs(_s.options, _s.table, 0)


def _substitute(raw: bytes, nodeids: list[int], fhs: list[int]) -> bytes:
    if len(raw) < 40:
        return raw
    out = bytearray(raw)
    opcode, _unique, nodeid = struct.unpack_from("<IQQ", raw, 4)
    if 2 <= nodeid < 16 and nodeid - 2 < len(nodeids):
        _U64.pack_into(out, 16, nodeids[nodeid - 2])
    for at in _FH_AT.get(opcode, ()):
        if len(raw) >= 48 + at and (i := _U64.unpack_from(raw, 40 + at)[0]) < len(fhs):
            _U64.pack_into(out, 40 + at, fhs[i])
    for at in _NODEID_AT.get(opcode, ()):
        if len(raw) >= 48 + at and 2 <= (n := _U64.unpack_from(raw, 40 + at)[0]) < 16 and (
                n - 2 < len(nodeids)):
            _U64.pack_into(out, 40 + at, nodeids[n - 2])
    return bytes(out)


def _remember(opcode: int, writable: list[memoryview], n: int, nodeids: list[int],
              fhs: list[int]) -> None:
    if n < 24:
        return
    body = b"".join(bytes(v) for v in writable)[16:n]
    if opcode in _ENTRY_OPS and _U64.unpack_from(body)[0]:
        nodeids.append(_U64.unpack_from(body)[0])
    if opcode in (Opcode.OPEN, Opcode.OPENDIR):
        fhs.append(_U64.unpack_from(body)[0])
    elif opcode in (Opcode.CREATE, Opcode.TMPFILE) and len(body) >= 136:
        fhs.append(_U64.unpack_from(body, 128)[0])


def _finish_deferred(server: FuseServer) -> None:
    """Cancel waiting SETLKWs; each must then be answered (collect) within a second, with
    a header-only reply when its writable part has room for one (the token)."""
    if not server.deferred:
        return
    server.cancel_deferred()
    deadline = time.monotonic() + 1.0
    while server.deferred:
        server.tick()
        for room, written in server.collect():
            if written != (16 if room >= 16 else 0):
                raise Broken(f"a cancelled SETLKW answered {written} bytes into {room}")
        if time.monotonic() > deadline:
            raise Broken("a cancelled SETLKW did not finish")
        time.sleep(0.001)


def one_input(data: bytes) -> None:
    variant, requests = fuse_input.parse(data)
    server = FuseServer(_s.fs, _s.options, session=fuse_input.session(variant, _s.options),
                        on_destroy=_s.table.clear)
    nodeids: list[int] = []
    fhs: list[int] = []
    try:
        for raw, cuts, sizes in requests:
            raw = _substitute(raw, nodeids, fhs)
            readable, writable = fuse_input.views(raw, cuts, sizes)
            n = server.handle(readable, writable, token=sum(map(len, writable)))
            _bugs.raise_any()
            if n is None:
                continue  # a SETLKW waits: answered in _finish_deferred
            fuse_input.check_answer(raw, writable, n)
            if os.geteuid() or os.getegid() or os.getgroups() or os.umask(0):
                raise Broken("credentials, groups or umask not restored after a request")
            _remember(int.from_bytes(raw[4:8], "little"), writable, n, nodeids, fhs)
        _finish_deferred(server)
    finally:
        server.cancel_deferred()
        _s.fs.destroy()
        _s.table.clear()
        server.close()
    _s.runs += 1
    if _s.runs % _WIPE_EVERY == 0:
        if _tree(_s.outside) != _s.snapshot:
            raise Broken("a directory next to the export changed")
        for entry in _s.export.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.name != "escape":
                entry.unlink()


def _session(c: FuseClient) -> None:
    """A file and a directory created, used and removed; fh 0 is the file's, 1 the dir's;
    nodeid 2 the file, 3 the directory."""
    ext = b"\x08\0\0\0\0\0\0\0"
    c.create(1, b"file", ext=ext)
    c.write(2, 0, 0, b"hello world\n" * 100)
    c.read(2, 0, 5, 100)
    c.getattr(2, fh=0)
    c.setattr(2, int(abi.Fattr.SIZE | abi.Fattr.MODE), size=7, mode=0o100600)
    c.call(Opcode.FALLOCATE, 2, abi.FALLOCATE_IN.pack(0, 0, 8192, 0, 0), out=0)
    c.call(Opcode.LSEEK, 2, abi.LSEEK_IN.pack(0, 0, 4, 0), out=8)
    c.call(Opcode.SETXATTR, 2, abi.SETXATTR_IN_EXT.pack(3, 0, 0, 0) + b"user.k\0abc", out=0)
    c.call(Opcode.GETXATTR, 2, abi.GETXATTR_IN.pack(64, 0) + b"user.k\0", out=64)
    c.call(Opcode.LISTXATTR, 2, abi.GETXATTR_IN.pack(0, 0), out=8)
    c.call(Opcode.REMOVEXATTR, 2, b"user.k\0", out=0)
    lk = abi.LK_IN.pack(0, 77, 0, 99, 1, 4321, 0, 0)
    c.call(Opcode.SETLK, 2, lk, out=0)
    c.call(Opcode.GETLK, 2, abi.LK_IN.pack(0, 78, 0, 99, 1, 1, 0, 0), out=24)
    c.call(Opcode.SETLKW, 2, abi.LK_IN.pack(0, 79, 0, 99, 1, 2, 0, 0), out=0)
    c.mkdir(1, b"dir")
    c.opendir(3)
    c.readdir(3, 1, plus=True)
    c.call(Opcode.FSYNC, 2, abi.FSYNC_IN.pack(0, 1, 0), out=0)
    c.call(Opcode.FLUSH, 2, abi.FLUSH_IN.pack(0, 0, 0, 77), out=0)
    c.release(2, 0)


def _namespace(c: FuseClient) -> None:
    c.mkdir(1, b"d")
    c.symlink(2, b"s", b"../../outside/secret")
    c.link(3, 2, b"hard")  # a hard link to a symlink (nodeid 3)
    c.mknod(2, b"fifo", 0o10644)
    c.rename(2, b"fifo", 1, b"moved")
    c.rename(1, b"moved", 2, b"back", flags=abi.RENAME_NOREPLACE)
    c.call(Opcode.READLINK, 3, out=4095)
    c.lookup(1, b"escape")
    c.lookup(1, b"..")
    c.call(Opcode.ACCESS, 2, abi.ACCESS_IN.pack(7, 0), out=0)
    c.unlink(2, b"hard")
    c.call(Opcode.TMPFILE, 2, abi.CREATE_IN.pack(os.O_RDWR, 0o600, 0, 0) + b"/\0", out=144)
    c.call(Opcode.COPY_FILE_RANGE, 5, abi.COPY_FILE_RANGE_IN.pack(0, 0, 5, 0, 4, 10, 0),
           out=8)
    c.call(Opcode.STATFS, 1, out=80)
    c.call(Opcode.SYNCFS, 1, abi.SYNCFS_IN.pack(0), out=0)
    c.call(Opcode.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(3, 1),
           writable=[])
    c.rmdir(1, b"d")


def seeds() -> Iterator[bytes]:
    for calls in (_session, _namespace):
        sent = fuse_input.capture(calls)
        for variant in (0, fuse_input.MINOR37):
            yield fuse_input.encode(variant, sent[:fuse_input.MAX_REQUESTS])
    yield from fuse_input.seeds(variants=(0,))
