"""FuseServer: one FUSE request, read from a descriptor chain, run on a FileSystem, answered
straight into the guest's buffers.

As virtiofsd's `Server::handle_message`: decode the in_header, pick one method per opcode
from a table, decode its body into Python values, call the file system, encode the reply.
The file system never sees bytes; `_reply_error` is the only writer of a negative errno.

Guest memory rules (PROTOCOLS.md trap 4): the readable and writable parts are byte streams
cut into arbitrary pieces. The header and arguments are copied out (unpack / bytes) before
anything is checked, so the guest cannot change them under us; WRITE and READ payloads are
never copied (`os.pwritev` / `os.preadv` on memoryview slices of guest memory).

Hot path (GETATTR, LOOKUP, READ, WRITE): precompiled Structs, tuple indexing, no per-request
objects beyond what the file system returns.

Deferred replies (SETLKW): `handle(readable, writable, token)` returns None when the request
waits (a lock held by someone else). The server keeps the chain's writable views and the
caller's `token`; when the wait ends, `deferred_fd` (an eventfd) becomes readable and
`collect()` writes the reply and returns `[(token, bytes written)]`, always from the
caller's thread. `interrupt(unique)` cancels one waiting request (it answers EINTR, so the
guest restarts the call after its signal handler), `cancel_deferred()` all of them (ENOLCK).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from vfsd.fuse import abi
from vfsd.fuse.abi import InitFlags, Opcode
from vfsd.fuse.init import InitError, Session, negotiate
from vfsd.fuse.options import FsOptions
from workers.passthrough.filesystem import Context, Entry, FileSystem, SecCtx, SetAttr
from workers.passthrough.locks import Lock, Waiter

log = logging.getLogger("vfsd.worker.server")

_IN = abi.IN_HEADER_38  # 7.37 reads the same bytes; total_extlen is used only from 7.38 on
_NO_HEADER = (0,) * 9  # `header` after a request too short to have one
_OUT = abi.OUT_HEADER
_IN_SIZE = _IN.size
_OUT_SIZE = _OUT.size
_NS = 1_000_000_000
_M32 = 0xFFFFFFFF
#: Largest argument block we copy out of guest memory (SETXATTR: 64 KiB value + name).
_MAX_ARGS = 128 * 1024
#: A fuse_write_out carries a u32; stay clear of it (and page aligned) for COPY_FILE_RANGE.
_MAX_COPY = (1 << 32) - 4096
_ZERO_ATTR = (0,) * 16
_INIT = int(Opcode.INIT)
_WRITE = int(Opcode.WRITE)

_ENTRY_OUT = abi.ENTRY_OUT.pack
_ATTR_OUT = abi.ATTR_OUT.pack
_OPEN_OUT = abi.OPEN_OUT.pack
_WRITE_OUT = abi.WRITE_OUT.pack
_DIRENT_INTO = abi.DIRENT.pack_into
_DIRENTPLUS_INTO = abi.DIRENTPLUS_HEAD.pack_into

Views = Sequence[memoryview]
Handler = Callable[[tuple[int, ...], bytes, Views, Views], "bytes | int | None"]


def _gather(views: Views, start: int, end: int) -> bytes:
    """Copy stream bytes [start, end) out of the views (shorter if the stream ends)."""
    pos = 0
    parts: list[memoryview] = []
    for v in views:
        n = len(v)
        if pos + n > start:
            a = start - pos if start > pos else 0
            b = end - pos
            if b <= n:
                if not parts:
                    return bytes(v[a:b])
                parts.append(v[a:b])
                break
            parts.append(v[a:])
        pos += n
    return b"".join(parts)


def _slice(views: Views, start: int, length: int) -> list[memoryview] | None:
    """Views covering exactly stream bytes [start, start+length), or None if too short."""
    if length <= 0:
        return []
    # Linux's layout: the payload starts on a buffer boundary and fills the rest of the chain
    # exactly (a 1 MiB READ into 256 separate pages): hand those views over as they are.
    pos = 0
    for i, v in enumerate(views):
        if pos >= start:
            if pos == start:
                rest = views[i:]
                if sum(map(len, rest)) == length:
                    return list(rest)
            break
        pos += len(v)
    out: list[memoryview] = []
    pos = 0
    for v in views:
        n = len(v)
        if pos + n > start:
            a = start - pos if start > pos else 0
            take = n - a
            if take >= length:
                out.append(v[a:a + length])
                return out
            out.append(v[a:])
            length -= take
        pos += n
    return None


def _stream_len(views: Views) -> int:
    return sum(map(len, views))


def _scatter(views: Views, data: bytes, start: int = 0) -> None:
    """Write `data` at stream offset `start` (caller checked it fits)."""
    mv = memoryview(data)
    end = len(data)
    done = 0
    pos = 0
    for v in views:
        n = len(v)
        if pos + n > start:
            a = start - pos if start > pos else 0
            take = min(n - a, end - done)
            v[a:a + take] = mv[done:done + take]
            done += take
            start += take
            if done == end:
                return
        pos += n


def _cstr(body: bytes, start: int) -> tuple[bytes, int]:
    """NUL-terminated string at `start` -> (string, offset after the NUL)."""
    i = body.find(b"\0", start)
    if i < 0:
        raise OSError(errno.EINVAL, "name without NUL")
    return body[start:i], i + 1


def _check_extensions(ext: bytes) -> None:
    """7.38 request extensions: a chain of {u32 size, u32 type} records filling `ext`.
    Supplementary groups are parsed past and ignored; security contexts are read by the
    creating ops (`_secctx`)."""
    pos = 0
    while pos < len(ext):
        if pos + 8 > len(ext):
            raise OSError(errno.EINVAL, "truncated extension header")
        size, _ = abi.EXT_HEADER.unpack_from(ext, pos)
        if size < 8 or size & 7 or pos + size > len(ext):
            raise OSError(errno.EINVAL, "bad extension size")
        pos += size


def _secctx_block(block: bytes, pos: int = 0) -> SecCtx:
    """The first context of a `fuse_secctx_header` block at `pos`: (xattr name, value), or
    None when it holds none (no LSM in the guest)."""
    if len(block) - pos < abi.SECCTX_HEADER.size:
        return None
    size, nr = abi.SECCTX_HEADER.unpack_from(block, pos)
    if nr == 0 or nr > abi.FUSE_MAX_NR_SECCTX:
        return None
    end = min(len(block), pos + size)
    pos += abi.SECCTX_HEADER.size
    if pos + abi.SECCTX.size > end:
        raise OSError(errno.EINVAL, "truncated security context")
    csize = abi.SECCTX.unpack_from(block, pos)[0]
    name, pos = _cstr(block[:end], pos + abi.SECCTX.size)
    value = block[pos:pos + csize]
    if len(value) != csize or not name:
        raise OSError(errno.EINVAL, "bad security context")
    return name, value


def _secctx_ext(ext: bytes) -> SecCtx:
    """The security context among 7.38 extensions (types 0..31 are secctx headers)."""
    pos = 0
    while pos + 8 <= len(ext):
        size, typ = abi.EXT_HEADER.unpack_from(ext, pos)
        if typ <= abi.FUSE_MAX_NR_SECCTX:
            return _secctx_block(ext[pos:pos + size])
        pos += max(size, 8)
    return None


class _Pending:
    """A deferred request: where its reply goes once its Waiter is done."""

    __slots__ = ("discard", "token", "unique", "waiter", "writable")

    def __init__(self, token: Any, unique: int, writable: Views, waiter: Waiter) -> None:
        self.token = token
        self.unique = unique
        self.writable = writable
        self.waiter = waiter
        self.discard = False


class FuseServer:
    """Serves FUSE requests of one session for one worker."""

    def __init__(
        self,
        fs: FileSystem,
        options: FsOptions | None = None,
        *,
        session: Session | None = None,
        on_destroy: Callable[[], None] | None = None,
    ) -> None:
        """`on_destroy` runs after DESTROY (or a second INIT) arrives as a request, i.e. when
        this server runs a session alone; the supervisor clears the shared table itself.
        `options` defaults to `fs.options`."""
        if options is None:
            options = getattr(fs, "options", None)
            if not isinstance(options, FsOptions):
                raise TypeError("FuseServer needs FsOptions (none given, fs has none)")
        self.fs = fs
        self.on_destroy = on_destroy
        self.header: tuple[int, ...] = _NO_HEADER
        self._set_options(options)
        self._session: Session | None = None
        self._extlen = False
        self._setxattr_size = abi.SETXATTR_IN.size
        self._secctx_on = False
        self._ext = b""  # this request's 7.38 extensions (valid while h[7] != 0)
        # Deferred requests (SETLKW): see the module docstring.
        self._deferred_fd = -1  # eventfd, made on first use
        self._pending: dict[int, _Pending] = {}  # id(waiter) -> request
        self._done: deque[Waiter] = deque()
        self._new_waiter: Waiter | None = None
        # uid/gid translation of attribute replies, only when configured (hot path).
        self._guest_uid: Callable[[int], int] | None = None
        self._guest_gid: Callable[[int], int] | None = None
        if getattr(fs, "idmapped", False):
            self._guest_uid = fs.guest_uid  # type: ignore[attr-defined]
            self._guest_gid = fs.guest_gid  # type: ignore[attr-defined]
            self._attr_out = self._attr_out_mapped  # type: ignore[method-assign]
            self._entry_out = self._entry_out_mapped  # type: ignore[method-assign]
        op = Opcode
        s = abi
        self._ops: dict[int, tuple[Handler, int]] = {
            op.LOOKUP: (self._lookup, 0),
            op.FORGET: (self._forget, s.FORGET_IN.size),
            op.GETATTR: (self._getattr, s.GETATTR_IN.size),
            op.SETATTR: (self._setattr, s.SETATTR_IN.size),
            op.READLINK: (self._readlink, 0),
            op.SYMLINK: (self._symlink, 0),
            op.MKNOD: (self._mknod, s.MKNOD_IN.size),
            op.MKDIR: (self._mkdir, s.MKDIR_IN.size),
            op.UNLINK: (self._unlink, 0),
            op.RMDIR: (self._rmdir, 0),
            op.RENAME: (self._rename, s.RENAME_IN.size),
            op.LINK: (self._link, s.LINK_IN.size),
            op.OPEN: (self._open, s.OPEN_IN.size),
            op.READ: (self._read, s.READ_IN.size),
            op.WRITE: (self._write, s.WRITE_IN.size),
            op.STATFS: (self._statfs, 0),
            op.RELEASE: (self._release, s.RELEASE_IN.size),
            op.FSYNC: (self._fsync, s.FSYNC_IN.size),
            op.SETXATTR: (self._setxattr, s.SETXATTR_IN.size),
            op.GETXATTR: (self._getxattr, s.GETXATTR_IN.size),
            op.LISTXATTR: (self._listxattr, s.GETXATTR_IN.size),
            op.REMOVEXATTR: (self._removexattr, 0),
            op.FLUSH: (self._flush, s.FLUSH_IN.size),
            op.INIT: (self._init, s.INIT_IN_COMPAT.size),
            op.OPENDIR: (self._opendir, s.OPEN_IN.size),
            op.READDIR: (self._readdir, s.READ_IN.size),
            op.RELEASEDIR: (self._releasedir, s.RELEASE_IN.size),
            op.FSYNCDIR: (self._fsyncdir, s.FSYNC_IN.size),
            op.ACCESS: (self._access, s.ACCESS_IN.size),
            op.CREATE: (self._create, s.CREATE_IN.size),
            op.INTERRUPT: (self._interrupt, 0),
            op.DESTROY: (self._destroy, 0),
            op.BATCH_FORGET: (self._batch_forget, s.BATCH_FORGET_IN.size),
            op.FALLOCATE: (self._fallocate, s.FALLOCATE_IN.size),
            op.READDIRPLUS: (self._readdirplus, s.READ_IN.size),
            op.RENAME2: (self._rename2, s.RENAME2_IN.size),
            op.LSEEK: (self._lseek, s.LSEEK_IN.size),
            op.COPY_FILE_RANGE: (self._copy_file_range, s.COPY_FILE_RANGE_IN.size),
            op.SYNCFS: (self._syncfs, 0),
            op.TMPFILE: (self._tmpfile, s.CREATE_IN.size),
            op.GETLK: (self._getlk, s.LK_IN.size),
            op.SETLK: (self._setlk, s.LK_IN.size),
            op.SETLKW: (self._setlkw, s.LK_IN.size),
            op.IOCTL: (self._ioctl, s.IOCTL_IN.size),
        }
        if session is not None:
            self.start_session(session)
        if os.environ.get("VFSD_TRACE"):  # debugging aid: one log line per request
            self.handle = self._traced_handle  # type: ignore[method-assign]

    def _traced_handle(self, readable: Views, writable: Views, token: Any = None) -> int | None:
        raw = _gather(readable, 0, _IN_SIZE + 96)
        n = FuseServer.handle(self, readable, writable, token)
        if len(raw) >= _IN_SIZE:
            h = _IN.unpack_from(raw)
            err = _OUT.unpack_from(_gather(writable, 0, _OUT_SIZE))[1] if n else 0
            extra = ""
            if h[1] == Opcode.SETATTR and len(raw) >= _IN_SIZE + abi.SETATTR_IN.size:
                a = abi.SETATTR_IN.unpack_from(raw, _IN_SIZE)
                extra = f" valid={a[0]:#x} mode={a[11]:o} fh={a[2]:#x}"
            if n and n >= _OUT_SIZE + abi.ATTR_OUT.size and h[1] in (Opcode.GETATTR,
                                                                     Opcode.SETATTR):
                extra += f" -> mode={abi.ATTR_OUT.unpack(_gather(writable, 16, 120))[12]:o}"
            log.info("trace pid=%d op=%d unique=%d nodeid=%#x uid=%d err=%d n=%s%s", os.getpid(),
                     h[1], h[2], h[3], h[4], err, n, extra)
        return n

    # ------------------------------------------------------------------ session
    @property
    def session(self) -> Session | None:
        return self._session

    def start_session(self, session: Session) -> None:
        """Adopt the session the supervisor negotiated (or our own INIT did)."""
        self._session = session
        self._extlen = session.has_extlen
        self._setxattr_size = (
            abi.SETXATTR_IN_EXT.size if session.has(InitFlags.SETXATTR_EXT)
            else abi.SETXATTR_IN.size
        )
        self._secctx_on = session.has(InitFlags.SECURITY_CTX) and self.options.security_label
        self.fs.start_session(session)

    def destroy(self) -> None:
        """End the session: every handle and cached fd of this worker is closed. Waiting
        requests are cancelled and never answered (the session they belong to is gone)."""
        for p in self._pending.values():
            p.discard = True
            p.waiter.cancel(errno.ENOLCK)
        self.fs.destroy()
        self._session = None

    def forgotten(self, nodeids: list[int]) -> int:
        """The supervisor freed these nodeids (FORGET): close their cached fds now."""
        return self.fs.forgotten(nodeids)

    def sweep(self) -> int:
        """Idle-time housekeeping: close cached fds of forgotten inodes."""
        sweep = getattr(self.fs, "sweep", None)
        return sweep() if sweep is not None else 0

    def _set_options(self, options: FsOptions) -> None:
        self.options = options
        t = options.timeout
        self._tv = int(t)
        self._tvn = round((t - int(t)) * _NS)
        self._negative = (
            _ENTRY_OUT(0, 0, self._tv, 0, self._tvn, 0, *_ZERO_ATTR) if t > 0 else None
        )

    def set_cache(self, cache: str) -> None:
        """SIGHUP: a new cache mode for entries and opens from now on (what INIT negotiated,
        e.g. CACHE_SYMLINKS, stays for the session)."""
        options = dataclasses.replace(self.options, cache=cache)  # type: ignore[arg-type]
        self._set_options(options)
        set_fs = getattr(self.fs, "set_options", None)
        if set_fs is not None:
            set_fs(options)

    def fs_state(self) -> tuple[int, int]:
        """(open handles, cached inode fds) for the metrics gauges."""
        handles = getattr(self.fs, "handles", ())
        inodes = getattr(self.fs, "inodes", ())
        return len(handles), len(inodes)

    # ------------------------------------------------------------------ entry point
    def handle(self, readable: Views, writable: Views, token: Any = None) -> int | None:
        """Serve one request; returns the bytes written into `writable` (0 = no reply), or
        None if the request was deferred: `collect()` reports `token` when it is answered."""
        if not readable:
            self.header = _NO_HEADER
            return 0
        r0 = readable[0]
        if len(r0) >= _IN_SIZE:
            h = _IN.unpack_from(r0)
        else:
            raw = _gather(readable, 0, _IN_SIZE)
            if len(raw) < _IN_SIZE:
                self.header = _NO_HEADER
                return 0  # not even a header: there is no `unique` to answer
            h = _IN.unpack_from(raw)
        self.header = h  # the request just served, for the worker's metrics
        in_len = h[0]
        opcode = h[1]
        try:
            op = self._ops.get(opcode)
            if op is None:
                raise OSError(errno.ENOSYS, "unknown opcode")
            fn, need = op
            if self._session is None and opcode != _INIT:
                raise OSError(errno.EIO, "no FUSE session (INIT first)")
            if in_len < _IN_SIZE:
                raise OSError(errno.EINVAL, "in.len shorter than the header")
            end = in_len if opcode != _WRITE else min(in_len, _IN_SIZE + need)
            if end - _IN_SIZE > _MAX_ARGS:
                raise OSError(errno.EINVAL, "arguments too large")
            if end == _IN_SIZE:
                body = b""
            else:
                r1 = readable[1] if len(r0) == _IN_SIZE and len(readable) > 1 else None
                if r1 is not None and len(r1) >= end - _IN_SIZE:
                    body = bytes(r1[:end - _IN_SIZE])  # the kernel's usual layout
                else:
                    body = _gather(readable, _IN_SIZE, end)
                if len(body) != end - _IN_SIZE:
                    raise OSError(errno.EINVAL, "in.len beyond the request buffer")
            if h[7] and self._extlen:
                ext_len = h[7] * 8
                if ext_len > len(body):
                    raise OSError(errno.EINVAL, "total_extlen beyond the request")
                ext = self._ext = body[len(body) - ext_len:]
                _check_extensions(ext)
                body = body[:len(body) - ext_len]
            if len(body) < need:
                raise OSError(errno.EINVAL, "request body too short")
            out = fn(h, body, readable, writable)
        except OSError as e:
            return self._reply_error(writable, h[2], e.errno or errno.EIO)
        except Exception:
            # A bug of ours, not the guest's: log it, answer EIO, keep serving.
            log.exception("opcode %d failed", opcode)
            return self._reply_error(writable, h[2], errno.EIO)
        if out is None:
            waiter = self._new_waiter
            if waiter is None:
                return 0
            self._new_waiter = None
            return self._defer(waiter, token, h[2], writable)
        if type(out) is int:
            return out
        return self._reply(writable, h[2], out)

    # ------------------------------------------------------------------ encoders
    def _reply(self, wr: Views, unique: int, body: bytes) -> int:
        n = _OUT_SIZE + len(body)
        if not wr:
            return 0
        w0 = wr[0]
        if len(w0) >= n:
            _OUT.pack_into(w0, 0, n, 0, unique)
            w0[_OUT_SIZE:n] = body
            return n
        if len(w0) == _OUT_SIZE and len(wr) > 1 and len(wr[1]) >= len(body):
            _OUT.pack_into(w0, 0, n, 0, unique)  # header and args in separate descriptors
            wr[1][:len(body)] = body
            return n
        if _stream_len(wr) < n:
            log.warning("reply of %d bytes does not fit the guest's buffer", n)
            return self._reply_error(wr, unique, errno.EIO)
        _scatter(wr, _OUT.pack(n, 0, unique) + body)
        return n

    def _put_header(self, wr: Views, n: int, unique: int) -> None:
        w0 = wr[0]
        if len(w0) >= _OUT_SIZE:
            _OUT.pack_into(w0, 0, n, 0, unique)
        else:
            _scatter(wr, _OUT.pack(n, 0, unique))

    @staticmethod
    def _reply_error(wr: Views, unique: int, err: int) -> int:
        """The only place a negative errno is written (header only, error in (-512, 0))."""
        if not 0 < err < 512:
            err = errno.EIO
        if not wr:
            return 0
        w0 = wr[0]
        if len(w0) >= _OUT_SIZE:
            _OUT.pack_into(w0, 0, _OUT_SIZE, -err, unique)
        elif _stream_len(wr) >= _OUT_SIZE:
            _scatter(wr, _OUT.pack(_OUT_SIZE, -err, unique))
        else:
            return 0
        return _OUT_SIZE

    def _attr_out(self, st: Any) -> bytes:
        return _ATTR_OUT(
            self._tv, self._tvn, 0,
            st.st_ino, st.st_size, st.st_blocks, st[7], st[8], st[9],
            st.st_atime_ns % _NS, st.st_mtime_ns % _NS, st.st_ctime_ns % _NS,
            st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev & _M32, st.st_blksize, 0,
        )

    def _entry_out(self, e: Entry) -> bytes:
        st = e.attr
        tv = self._tv
        tvn = self._tvn
        return _ENTRY_OUT(
            e.nodeid, 0, tv, tv, tvn, tvn,
            st.st_ino, st.st_size, st.st_blocks, st[7], st[8], st[9],
            st.st_atime_ns % _NS, st.st_mtime_ns % _NS, st.st_ctime_ns % _NS,
            st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev & _M32, st.st_blksize,
            e[2],
        )

    # With translate_uid / translate_gid: the same, owner ids seen from the guest.
    def _attr_out_mapped(self, st: Any) -> bytes:
        assert self._guest_uid is not None and self._guest_gid is not None
        return _ATTR_OUT(
            self._tv, self._tvn, 0,
            st.st_ino, st.st_size, st.st_blocks, st[7], st[8], st[9],
            st.st_atime_ns % _NS, st.st_mtime_ns % _NS, st.st_ctime_ns % _NS,
            st.st_mode, st.st_nlink, self._guest_uid(st.st_uid), self._guest_gid(st.st_gid),
            st.st_rdev & _M32, st.st_blksize, 0,
        )

    def _entry_out_mapped(self, e: Entry) -> bytes:
        assert self._guest_uid is not None and self._guest_gid is not None
        st = e.attr
        tv = self._tv
        tvn = self._tvn
        return _ENTRY_OUT(
            e.nodeid, 0, tv, tv, tvn, tvn,
            st.st_ino, st.st_size, st.st_blocks, st[7], st[8], st[9],
            st.st_atime_ns % _NS, st.st_mtime_ns % _NS, st.st_ctime_ns % _NS,
            st.st_mode, st.st_nlink, self._guest_uid(st.st_uid), self._guest_gid(st.st_gid),
            st.st_rdev & _M32, st.st_blksize, e[2],
        )

    # ------------------------------------------------------------------ inode ops
    def _lookup(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        name, _ = _cstr(body, 0)
        try:
            return self._entry_out(self.fs.lookup(h[3], name))
        except FileNotFoundError:
            if self._negative is None:
                raise
            return self._negative  # nodeid 0: negative entry, cached for entry_valid

    def _forget(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> None:
        self.fs.forget(h[3], abi.FORGET_IN.unpack_from(body)[0])

    def _batch_forget(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> None:
        count = abi.BATCH_FORGET_IN.unpack_from(body)[0]
        count = min(count, (len(body) - 8) // abi.FORGET_ONE.size)
        unpack = abi.FORGET_ONE.unpack_from
        forget = self.fs.forget
        for i in range(count):
            nodeid, nlookup = unpack(body, 8 + 16 * i)
            forget(nodeid, nlookup)

    def _interrupt(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> None:
        """Cancel the waiting request with that unique, if any (it may have finished: then
        there is nothing to do). INTERRUPT has no reply."""
        if len(body) >= abi.INTERRUPT_IN.size:
            self.interrupt(abi.INTERRUPT_IN.unpack_from(body)[0])

    def _getattr(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        flags, _, fh = abi.GETATTR_IN.unpack_from(body)
        return self._attr_out(
            self.fs.getattr(h[3], fh if flags & abi.FUSE_GETATTR_FH else None)
        )

    def _setattr(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        (valid, _, fh, size, _lock_owner, atime, mtime, _ctime, atimensec, mtimensec,
         _ctimensec, mode, _, uid, gid, _) = abi.SETATTR_IN.unpack_from(body)
        attr = SetAttr(valid, fh, size, atime, atimensec, mtime, mtimensec, mode, uid, gid)
        return self._attr_out(self.fs.setattr(h[3], attr))

    def _readlink(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        return self.fs.readlink(h[3])

    def _access(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        mask = abi.ACCESS_IN.unpack_from(body)[0]
        self.fs.access(Context(h[4], h[5], h[6]), h[3], mask)
        return b""

    def _statfs(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        s = self.fs.statfs(h[3])
        return abi.STATFS_OUT.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
            s.f_bsize, s.f_namemax, s.f_frsize, 0,
        )

    # ------------------------------------------------------------------ namespace ops
    def _secctx(self, h: tuple[int, ...], body: bytes, pos: int) -> SecCtx:
        """The security context of a creating op: in the 7.38 extensions, or (7.37) the
        block after its last name. None unless security_label is on."""
        if not self._secctx_on:
            return None
        if self._extlen:
            return _secctx_ext(self._ext) if h[7] else None
        return _secctx_block(body, pos)

    def _mknod(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(body)
        name, pos = _cstr(body, abi.MKNOD_IN.size)
        ctx = Context(h[4], h[5], h[6])
        return self._entry_out(self.fs.mknod(ctx, h[3], name, mode, rdev, umask,
                                             self._secctx(h, body, pos)))

    def _mkdir(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        mode, umask = abi.MKDIR_IN.unpack_from(body)
        name, pos = _cstr(body, abi.MKDIR_IN.size)
        ctx = Context(h[4], h[5], h[6])
        return self._entry_out(self.fs.mkdir(ctx, h[3], name, mode, umask,
                                             self._secctx(h, body, pos)))

    def _symlink(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        name, pos = _cstr(body, 0)
        target, pos = _cstr(body, pos)
        ctx = Context(h[4], h[5], h[6])
        return self._entry_out(self.fs.symlink(ctx, h[3], name, target,
                                               self._secctx(h, body, pos)))

    def _link(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        oldnodeid = abi.LINK_IN.unpack_from(body)[0]
        name, _ = _cstr(body, abi.LINK_IN.size)
        return self._entry_out(self.fs.link(oldnodeid, h[3], name))

    def _unlink(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        self.fs.unlink(h[3], _cstr(body, 0)[0])
        return b""

    def _rmdir(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        self.fs.rmdir(h[3], _cstr(body, 0)[0])
        return b""

    def _rename(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        newdir = abi.RENAME_IN.unpack_from(body)[0]
        old, pos = _cstr(body, abi.RENAME_IN.size)
        new, _ = _cstr(body, pos)
        self.fs.rename(h[3], old, newdir, new, 0)
        return b""

    def _rename2(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        newdir, flags, _ = abi.RENAME2_IN.unpack_from(body)
        old, pos = _cstr(body, abi.RENAME2_IN.size)
        new, _ = _cstr(body, pos)
        self.fs.rename(h[3], old, newdir, new, flags)
        return b""

    # ------------------------------------------------------------------ file ops
    def _open(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        flags, open_flags = abi.OPEN_IN.unpack_from(body)
        if open_flags & abi.FUSE_OPEN_KILL_SUIDGID:
            fh, fopen = self.fs.open(h[3], flags, True)
        else:
            fh, fopen = self.fs.open(h[3], flags)
        return _OPEN_OUT(fh, fopen, 0)

    def _create(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        flags, mode, umask, open_flags = abi.CREATE_IN.unpack_from(body)
        name, pos = _cstr(body, abi.CREATE_IN.size)
        entry, (fh, fopen) = self.fs.create(
            Context(h[4], h[5], h[6]), h[3], name, mode, flags, umask,
            bool(open_flags & abi.FUSE_OPEN_KILL_SUIDGID), self._secctx(h, body, pos),
        )
        return self._entry_out(entry) + _OPEN_OUT(fh, fopen, 0)

    def _tmpfile(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        """O_TMPFILE (7.37): as CREATE, with the placeholder name "/" and no entry made."""
        flags, mode, umask, _ = abi.CREATE_IN.unpack_from(body)
        _name, pos = _cstr(body, abi.CREATE_IN.size)
        entry, (fh, fopen) = self.fs.tmpfile(
            Context(h[4], h[5], h[6]), h[3], mode, flags, umask, self._secctx(h, body, pos)
        )
        return self._entry_out(entry) + _OPEN_OUT(fh, fopen, 0)

    def _read(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> int:
        fh, offset, size, _, _, _, _ = abi.READ_IN.unpack_from(body)
        bufs = _slice(wr, _OUT_SIZE, size)
        if bufs is None or (not size and _stream_len(wr) < _OUT_SIZE):
            raise OSError(errno.EIO, "READ buffer smaller than size")
        n = self.fs.read(h[3], fh, offset, bufs)
        self._put_header(wr, _OUT_SIZE + n, h[2])
        return _OUT_SIZE + n

    def _write(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, offset, size, write_flags, _, _, _ = abi.WRITE_IN.unpack_from(body)
        start = _IN_SIZE + abi.WRITE_IN.size
        if start + size > h[0]:
            raise OSError(errno.EINVAL, "WRITE size beyond in.len")
        bufs = _slice(rd, start, size)
        if bufs is None:
            raise OSError(errno.EINVAL, "WRITE data beyond the request buffer")
        n = self.fs.write(h[3], fh, offset, bufs, write_flags)
        return _WRITE_OUT(n, 0)

    def _flush(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, _, _, lock_owner = abi.FLUSH_IN.unpack_from(body)
        self.fs.flush(h[3], fh, lock_owner)
        return b""

    def _release(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, flags, release_flags, _ = abi.RELEASE_IN.unpack_from(body)
        self.fs.release(h[3], fh, flags, release_flags)
        return b""

    def _fsync(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
        self.fs.fsync(h[3], fh, bool(flags & abi.FUSE_FSYNC_FDATASYNC))
        return b""

    def _fallocate(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(body)
        self.fs.fallocate(h[3], fh, offset, length, mode)
        return b""

    def _lseek(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(body)
        return abi.LSEEK_OUT.pack(self.fs.lseek(h[3], fh, offset, whence))

    def _copy_file_range(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = (
            abi.COPY_FILE_RANGE_IN.unpack_from(body)
        )
        n = self.fs.copy_file_range(
            fh_in, off_in, nodeid_out, fh_out, off_out, min(length, _MAX_COPY), flags
        )
        return _WRITE_OUT(n, 0)

    def _syncfs(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        self.fs.syncfs(h[3])
        return b""

    # ------------------------------------------------------------------ directories
    def _opendir(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        flags = abi.OPEN_IN.unpack_from(body)[0]
        fh, fopen = self.fs.opendir(h[3], flags)
        return _OPEN_OUT(fh, fopen, 0)

    def _releasedir(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        self.fs.releasedir(h[3], abi.RELEASE_IN.unpack_from(body)[0])
        return b""

    def _fsyncdir(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
        self.fs.fsyncdir(h[3], fh, bool(flags & abi.FUSE_FSYNC_FDATASYNC))
        return b""

    def _readdir(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> int:
        return self._dirents(h, body, wr, plus=False)

    def _readdirplus(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> int:
        return self._dirents(h, body, wr, plus=True)

    def _dirents(self, h: tuple[int, ...], body: bytes, wr: Views, plus: bool) -> int:
        """Pack whole records (D.7) up to min(size, buffer). READDIRPLUS looks an entry up
        (nlookup += 1) only once its record is known to fit, and never "." / ".."."""
        nodeid = h[3]
        fh, offset, size = abi.READ_IN.unpack_from(body)[:3]
        limit = min(size, _stream_len(wr) - _OUT_SIZE)
        if limit < 0:
            raise OSError(errno.EIO, "no room for a reply")
        out = bytearray(limit)
        used = 0
        fs = self.fs
        head = 152 if plus else 24
        tv, tvn = self._tv, self._tvn
        guest_uid, guest_gid = self._guest_uid, self._guest_gid
        it = fs.readdir(nodeid, fh, offset)
        try:
            for ino, off, dtype, name in it:
                nl = len(name)
                rec = (head + nl + 7) & ~7
                if used + rec > limit:
                    if used == 0:
                        raise OSError(errno.EINVAL, "buffer too small for one entry")
                    break
                if not plus:
                    _DIRENT_INTO(out, used, ino, off, nl, dtype)
                else:
                    e = None
                    if name != b"." and name != b"..":
                        try:
                            e = fs.readdir_lookup(nodeid, fh, name)
                        except OSError:
                            e = None  # vanished or unreachable: list it without attributes
                    if e is None:
                        _DIRENTPLUS_INTO(out, used, 0, 0, 0, 0, 0, 0, *_ZERO_ATTR,
                                         ino, off, nl, dtype)
                    else:
                        st = e.attr
                        mode = st.st_mode
                        uid, gid = st.st_uid, st.st_gid
                        if guest_uid is not None:
                            uid, gid = guest_uid(uid), guest_gid(gid)  # type: ignore[misc]
                        _DIRENTPLUS_INTO(
                            out, used, e.nodeid, 0, tv, tv, tvn, tvn,
                            st.st_ino, st.st_size, st.st_blocks, st[7], st[8], st[9],
                            st.st_atime_ns % _NS, st.st_mtime_ns % _NS, st.st_ctime_ns % _NS,
                            mode, st.st_nlink, uid, gid, st.st_rdev & _M32,
                            st.st_blksize, e[2],
                            ino, off, nl, dtype or (mode >> 12) & 0xF,
                        )
                out[used + head:used + head + nl] = name
                used += rec
        except OSError:
            if used == 0:
                raise
            # Entries already looked up must reach the guest; it retries from the last cookie.
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        n = _OUT_SIZE + used
        self._put_header(wr, n, h[2])
        if used:
            _scatter(wr, memoryview(out)[:used], _OUT_SIZE)
        return n

    # ------------------------------------------------------------------ locks
    def _lock_args(self, body: bytes) -> tuple[int, int, Lock, bool]:
        fh, owner, start, end, typ, pid, lk_flags, _ = abi.LK_IN.unpack_from(body)
        return fh, owner, Lock(start, end, typ, pid), bool(lk_flags & abi.FUSE_LK_FLOCK)

    def _getlk(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, owner, lock, _flock = self._lock_args(body)
        got = self.fs.getlk(h[3], fh, owner, lock)
        return abi.LK_OUT.pack(got.start, got.end, got.type, got.pid)

    def _setlk(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fh, owner, lock, flock = self._lock_args(body)
        self.fs.setlk(h[3], fh, owner, lock, flock, False)
        return b""

    def _setlkw(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes | None:
        fh, owner, lock, flock = self._lock_args(body)
        waiter = self.fs.setlk(h[3], fh, owner, lock, flock, True)
        if waiter is None:
            return b""
        self._new_waiter = waiter  # handle() defers the request
        return None

    def _ioctl(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        # No ioctl is passed through: the host's would act on host state.
        raise OSError(errno.ENOTTY, "no ioctls")

    # ------------------------------------------------------------------ deferred replies
    def _defer(self, waiter: Waiter, token: Any, unique: int, writable: Views) -> None:
        self.deferred_fd  # noqa: B018 (exists before the waiter can signal it)
        p = _Pending(token, unique, writable, waiter)
        self._pending[id(waiter)] = p
        waiter.start(self._waiter_done)
        return None

    def _waiter_done(self, waiter: Waiter) -> None:
        """Runs in the waiter's thread: hand it to the main thread."""
        self._done.append(waiter)
        try:
            os.eventfd_write(self._deferred_fd, 1)
        except OSError:
            pass

    @property
    def deferred_fd(self) -> int:
        """Readable when `collect()` has answers to hand out."""
        if self._deferred_fd < 0:
            self._deferred_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self._deferred_fd

    def close(self) -> None:
        """Drop the session and the eventfd (tests; a worker process just exits)."""
        if self._pending:
            self.destroy()
        if self._deferred_fd >= 0:
            os.close(self._deferred_fd)
            self._deferred_fd = -1

    @property
    def deferred(self) -> int:
        """Requests waiting (or finished, not yet collected)."""
        return len(self._pending)

    def collect(self) -> list[tuple[Any, int]]:
        """Answer the deferred requests whose wait ended: [(token, bytes written)]."""
        if self._deferred_fd >= 0:
            try:
                os.eventfd_read(self._deferred_fd)
            except BlockingIOError:
                pass
        out: list[tuple[Any, int]] = []
        done = self._done
        while done:
            waiter = done.popleft()
            p = self._pending.pop(id(waiter), None)
            discard = p is None or p.discard
            try:
                self.fs.lock_done(waiter, discard)  # type: ignore[call-arg]
            except Exception:
                log.exception("finishing a lock wait failed")
            if discard:
                continue
            assert p is not None
            err = waiter.error
            if err:
                written = self._reply_error(p.writable, p.unique, err)
            else:
                written = self._reply(p.writable, p.unique, b"")
            out.append((p.token, written))
        return out

    def interrupt(self, unique: int) -> bool:
        """Cancel the deferred request `unique` (EINTR); False if none is waiting."""
        for p in self._pending.values():
            if p.unique == unique and not p.discard:
                p.waiter.cancel(errno.EINTR)
                return True
        return False

    def cancel_deferred(self, err: int = errno.ENOLCK) -> int:
        """Cancel every waiting request (they answer `err` through collect()); returns how
        many. For a ring stop or a session end: the guest cannot wait for them."""
        n = 0
        for p in self._pending.values():
            if not p.discard:
                p.waiter.cancel(err)
                n += 1
        return n

    def tick(self) -> None:
        """Idle housekeeping: re-signal cancelled waiters that are still blocked (a signal
        sent just before a waiter entered its blocking call is lost)."""
        for p in self._pending.values():
            w = p.waiter
            if w.cancelled and not w.finished.is_set():
                w.cancel(w.cancelled)

    # ------------------------------------------------------------------ xattrs
    def _setxattr(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        fixed = self._setxattr_size
        if len(body) < fixed:
            raise OSError(errno.EINVAL, "short SETXATTR")
        size, flags = abi.SETXATTR_IN.unpack_from(body)
        xflags = abi.SETXATTR_IN_EXT.unpack_from(body)[2] if fixed > abi.SETXATTR_IN.size else 0
        name, pos = _cstr(body, fixed)
        value = body[pos:pos + size]
        if len(value) != size:
            raise OSError(errno.EINVAL, "SETXATTR value beyond the request")
        if xflags:
            self.fs.setxattr(h[3], name, value, flags, xflags)
        else:
            self.fs.setxattr(h[3], name, value, flags)
        return b""

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return abi.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    def _getxattr(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        size = abi.GETXATTR_IN.unpack_from(body)[0]
        name, _ = _cstr(body, abi.GETXATTR_IN.size)
        return self._sized(self.fs.getxattr(h[3], name), size)

    def _listxattr(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        size = abi.GETXATTR_IN.unpack_from(body)[0]
        return self._sized(self.fs.listxattr(h[3]), size)

    def _removexattr(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        self.fs.removexattr(h[3], _cstr(body, 0)[0])
        return b""

    # ------------------------------------------------------------------ session ops
    def _init(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        """INIT served in-process (single-worker / tests); the supervisor normally does it."""
        if self._session is not None:  # a new INIT ends the previous session
            self._end_session()
        try:
            reply, session = negotiate(body, self.options)
        except InitError as e:
            log.error("FUSE INIT refused: %s", e)
            raise OSError(e.errno_hint, str(e)) from e
        self.start_session(session)
        return reply

    def _destroy(self, h: tuple[int, ...], body: bytes, rd: Views, wr: Views) -> bytes:
        self._end_session()
        return b""

    def _end_session(self) -> None:
        self.destroy()
        if self.on_destroy is not None:
            self.on_destroy()
