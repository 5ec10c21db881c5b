"""FUSE_INIT negotiation (PROTOCOLS.md D.4): pure, run by the supervisor as a barrier.

`negotiate` turns the kernel's `fuse_init_in` body into our `fuse_init_out` body and a frozen
`Session` that every worker receives (orjson via `to_dict`/`from_dict`) before serving.
"""

from __future__ import annotations

import errno
from dataclasses import asdict, dataclass
from typing import Any

from vfsd.fuse import abi
from vfsd.fuse.abi import InitFlags as F
from vfsd.fuse.options import FsOptions

#: 256 pages = 1 MiB per READ/WRITE; the kernel caps max_pages at queue_size - 4 itself.
MAX_PAGES = 256
MAX_WRITE = MAX_PAGES * 4096
#: Async requests (readahead, RELEASE, writeback) the kernel keeps in flight; a pool of workers
#: can use more than the kernel default of 12.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
TIME_GRAN = 1

#: Always offered when the kernel offers them: behaviour we implement unconditionally.
#: - EXPORT_SUPPORT: LOOKUP of "." and ".." works (".." of the root is the root).
#: - ATOMIC_O_TRUNC: OPEN honours O_TRUNC.
#: - DONT_MASK: MKNOD/MKDIR/CREATE apply the request's umask themselves (process umask is 0).
_BASE = (
    F.ASYNC_READ | F.BIG_WRITES | F.MAX_PAGES | F.PARALLEL_DIROPS | F.AUTO_INVAL_DATA
    | F.EXPORT_SUPPORT | F.ATOMIC_O_TRUNC | F.DONT_MASK
)


class InitError(OSError):
    """The kernel's INIT cannot be accepted; reply with `errno_hint` (also `errno`: an
    OSError, which is what the supervisor's INIT barrier turns into an error reply)."""

    def __init__(self, message: str, errno_hint: int = errno.EPROTO) -> None:
        super().__init__(errno_hint, message)
        self.errno_hint = errno_hint


@dataclass(frozen=True, slots=True)
class Session:
    """What INIT settled; identical in every worker."""

    major: int
    minor: int
    #: Negotiated 64-bit flag set (flags | flags2 << 32) = what we replied.
    flags: int
    #: What the kernel offered (for logs and diagnostics).
    kernel_flags: int
    max_readahead: int
    max_write: int
    max_pages: int
    time_gran: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def has_extlen(self) -> bool:
        """7.38+: `fuse_in_header.total_extlen` is meaningful."""
        return self.minor >= 38

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Session:
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


def negotiate(init_in: bytes, options: FsOptions) -> tuple[bytes, Session]:
    """Decide the session from the INIT request body; return (`fuse_init_out` body, Session).

    Raises `InitError` (reply with its errno) for a kernel we cannot serve.
    """
    if len(init_in) < abi.INIT_IN_COMPAT.size:
        raise InitError(f"INIT body too short ({len(init_in)} bytes)", errno.EINVAL)
    major, minor, max_readahead, flags = abi.INIT_IN_COMPAT.unpack_from(init_in)
    if major == abi.FUSE_INIT_BSWAP_RESERVED:
        raise InitError("opposite-endian guest", errno.EPROTO)
    if major != abi.FUSE_KERNEL_VERSION:
        raise InitError(f"unsupported FUSE major {major}", errno.EPROTO)
    if minor < abi.FUSE_MIN_MINOR:
        raise InitError(f"FUSE 7.{minor} is older than 7.{abi.FUSE_MIN_MINOR}", errno.EPROTO)
    # flags2 exists only when the kernel set INIT_EXT (7.36+) and sent the 64-byte body.
    if flags & F.INIT_EXT and len(init_in) >= abi.INIT_IN.size:
        flags |= abi.INIT_IN.unpack_from(init_in)[4] << 32
    kernel_flags = flags

    want = _BASE
    if options.readdirplus:
        want |= F.DO_READDIRPLUS | F.READDIRPLUS_AUTO
    if options.cache != "never":
        want |= F.CACHE_SYMLINKS
    if options.writeback and not options.readonly:
        want |= F.WRITEBACK_CACHE
    if options.posix_lock:
        want |= F.POSIX_LOCKS
    if options.flock:
        want |= F.FLOCK_LOCKS
    if options.xattr_enabled:
        want |= F.SETXATTR_EXT  # 16-byte fuse_setxattr_in (ACL_KILL_SGID)
    if options.posix_acl:
        want |= F.POSIX_ACL
    if options.security_label:
        want |= F.SECURITY_CTX
    if options.killpriv_v2:
        want |= F.HANDLE_KILLPRIV_V2
    if options.announce_submounts:
        want |= F.SUBMOUNTS
    # INIT_EXT: echoed whenever the kernel offers it (later kernels ignore flags2 without it).
    want |= F.INIT_EXT
    negotiated = int(kernel_flags & want)

    out_minor = min(minor, abi.FUSE_MAX_MINOR)
    out_flags, out_flags2 = abi.split_init_flags(negotiated)
    body = abi.INIT_OUT.pack(
        abi.FUSE_KERNEL_VERSION, out_minor, max_readahead, out_flags,
        MAX_BACKGROUND, CONGESTION_THRESHOLD, MAX_WRITE, TIME_GRAN, MAX_PAGES, 0, out_flags2,
    )
    session = Session(
        major=abi.FUSE_KERNEL_VERSION, minor=out_minor, flags=negotiated,
        kernel_flags=int(kernel_flags), max_readahead=max_readahead, max_write=MAX_WRITE,
        max_pages=MAX_PAGES, time_gran=TIME_GRAN,
    )
    return body, session
