"""FUSE wire layouts as spoken by Linux 6.1 virtiofs (protocol 7.37 / 7.38).

One precompiled `struct.Struct` per C struct (PROTOCOLS.md D.1-D.7); no format string lives
anywhere else. All little-endian. Pure: no syscalls, no state.

Deliberate difference from the C header: the `fuse_attr` and `fuse_setattr_in` times are signed
(`q`), so pre-1970 host times encode as the guest kernel reads them (it assigns them to a
signed `tv_sec`); the byte layout and size are unchanged.
"""

from __future__ import annotations

import enum
import struct

FUSE_KERNEL_VERSION = 7
#: Highest minor we speak; replies use min(kernel minor, this).
FUSE_MAX_MINOR = 38
#: Oldest minor we accept (7.31 = Linux 5.4, first with virtiofs upstream).
FUSE_MIN_MINOR = 31
FUSE_ROOT_ID = 1
FUSE_INIT_BSWAP_RESERVED = 26 << 24
#: VFS name limit; the wire allows 1024 (FUSE_NAME_MAX) but Linux never sends longer than this.
NAME_MAX = 255
FUSE_NAME_MAX = 1024
FUSE_DIRENT_ALIGN = 8
MAX_HANDLE_SZ = 128


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    CUSE_INIT = 4096


#: Ops whose body starts with the u64 fh (ARCHITECTURE.md "A request's trip"): routed to the
#: fh's owner.
FH_OPCODES = frozenset(
    {
        Opcode.READ, Opcode.WRITE, Opcode.FLUSH, Opcode.RELEASE, Opcode.FSYNC,
        Opcode.READDIR, Opcode.READDIRPLUS, Opcode.RELEASEDIR, Opcode.FSYNCDIR,
        Opcode.GETLK, Opcode.SETLK, Opcode.SETLKW, Opcode.LSEEK, Opcode.FALLOCATE,
        Opcode.COPY_FILE_RANGE, Opcode.IOCTL, Opcode.POLL,
    }
)
#: Ops that never get a reply (no writable part in the chain).
NO_REPLY_OPCODES = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})


class InitFlags(enum.IntFlag):
    """`fuse_init_in/out.flags` (bits 0-31) and `flags2` (bits 32-63) as one 64-bit set."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    # flags2 (7.36+), shifted up by 32
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35


class Fattr(enum.IntFlag):
    """`fuse_setattr_in.valid`."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class Fopen(enum.IntFlag):
    """`fuse_open_out.open_flags`."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6


# Plain-int copies of the flags the hot path tests (IntFlag arithmetic is slow).
FATTR_MODE = int(Fattr.MODE)
FATTR_UID = int(Fattr.UID)
FATTR_GID = int(Fattr.GID)
FATTR_SIZE = int(Fattr.SIZE)
FATTR_ATIME = int(Fattr.ATIME)
FATTR_MTIME = int(Fattr.MTIME)
FATTR_FH = int(Fattr.FH)
FATTR_ATIME_NOW = int(Fattr.ATIME_NOW)
FATTR_MTIME_NOW = int(Fattr.MTIME_NOW)
FATTR_LOCKOWNER = int(Fattr.LOCKOWNER)
FATTR_CTIME = int(Fattr.CTIME)
FATTR_KILL_SUIDGID = int(Fattr.KILL_SUIDGID)

FOPEN_DIRECT_IO = int(Fopen.DIRECT_IO)
FOPEN_KEEP_CACHE = int(Fopen.KEEP_CACHE)
FOPEN_CACHE_DIR = int(Fopen.CACHE_DIR)

FUSE_GETATTR_FH = 1 << 0
FUSE_OPEN_KILL_SUIDGID = 1 << 0
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_FSYNC_FDATASYNC = 1 << 0
FUSE_LK_FLOCK = 1 << 0
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0
FUSE_ATTR_SUBMOUNT = 1 << 0
FUSE_ATTR_DAX = 1 << 1
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
FUSE_MAX_NR_SECCTX = 31
FUSE_EXT_GROUPS = 32

# D.1 headers
IN_HEADER = struct.Struct("<IIQQIIII")  # 7.37: len opcode unique nodeid uid gid pid padding
IN_HEADER_38 = struct.Struct("<IIQQIIIHH")  # 7.38: ... pid total_extlen(u16, 8-byte units) pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique

# D.3 common structures
_ATTR_FMT = "QQQqqqIIIIIIIIII"
ATTR = struct.Struct("<" + _ATTR_FMT)
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid *_nsec
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR_FMT)
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
ATTR_OUT = struct.Struct("<QII" + _ATTR_FMT)
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
FILE_LOCK = struct.Struct("<QQII")

# D.4 INIT
INIT_IN = struct.Struct("<IIIII44x")  # major minor max_readahead flags flags2 unused[11]
INIT_IN_COMPAT = struct.Struct("<IIII")  # pre-7.36 body: no flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")

# D.5 per-request layouts
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")  # times signed, as fuse_attr
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
CREATE_IN = struct.Struct("<IIII")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<II")  # without SETXATTR_EXT
SETXATTR_IN_EXT = struct.Struct("<IIII")  # with SETXATTR_EXT
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
LK_IN = struct.Struct("<QQQQIIII")
LK_OUT = struct.Struct("<QQII")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
BMAP_IN = struct.Struct("<QII")
IOCTL_IN = struct.Struct("<QIIQII")
POLL_IN = struct.Struct("<QQII")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
SYNCFS_IN = struct.Struct("<Q")

# D.6 extensions
EXT_HEADER = struct.Struct("<II")  # size (incl. header), type
SECCTX_HEADER = struct.Struct("<II")  # size, nr_secctx
SECCTX = struct.Struct("<II")  # size, padding

# D.7 directory records
DIRENT = struct.Struct("<QQII")  # ino off namelen type
DIRENTPLUS_HEAD = struct.Struct("<QQQQII" + _ATTR_FMT + "QQII")  # entry_out + dirent head


def dirent_size(namelen: int) -> int:
    """Bytes one `fuse_dirent` record takes, padding included."""
    return (24 + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    return (152 + namelen + 7) & ~7


def split_init_flags(flags: int) -> tuple[int, int]:
    """64-bit flag set -> (flags, flags2) wire words."""
    return flags & 0xFFFFFFFF, (flags >> 32) & 0xFFFFFFFF
