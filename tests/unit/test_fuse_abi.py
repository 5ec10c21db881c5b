"""FUSE ABI layouts (sizes from PROTOCOLS.md D, golden vectors) and INIT negotiation."""

import errno

import orjson
import pytest

from vfsd.fuse import abi
from vfsd.fuse.abi import InitFlags as F
from vfsd.fuse.abi import Opcode
from vfsd.fuse.init import MAX_PAGES, MAX_WRITE, InitError, Session, negotiate
from vfsd.fuse.options import FsOptions

SIZES = {
    "IN_HEADER": 40, "IN_HEADER_38": 40, "OUT_HEADER": 16, "ATTR": 88, "ENTRY_OUT": 128,
    "ENTRY_OUT_HEAD": 40, "ATTR_OUT": 104, "ATTR_OUT_HEAD": 16, "STATFS_OUT": 80,
    "FILE_LOCK": 24, "INIT_IN": 64, "INIT_IN_COMPAT": 16, "INIT_OUT": 64, "FORGET_IN": 8,
    "BATCH_FORGET_IN": 8, "FORGET_ONE": 16, "GETATTR_IN": 16, "SETATTR_IN": 88,
    "MKNOD_IN": 16, "MKDIR_IN": 8, "RENAME_IN": 8, "RENAME2_IN": 16, "LINK_IN": 8,
    "OPEN_IN": 8, "OPEN_OUT": 16, "CREATE_IN": 16, "READ_IN": 40, "WRITE_IN": 40,
    "WRITE_OUT": 8, "RELEASE_IN": 24, "FLUSH_IN": 24, "FSYNC_IN": 16, "SETXATTR_IN": 8,
    "SETXATTR_IN_EXT": 16, "GETXATTR_IN": 8, "GETXATTR_OUT": 8, "LK_IN": 48, "LK_OUT": 24,
    "ACCESS_IN": 8, "INTERRUPT_IN": 8, "BMAP_IN": 16, "IOCTL_IN": 32, "POLL_IN": 24,
    "FALLOCATE_IN": 32, "LSEEK_IN": 24, "LSEEK_OUT": 8, "COPY_FILE_RANGE_IN": 56,
    "SYNCFS_IN": 8, "EXT_HEADER": 8, "SECCTX_HEADER": 8, "SECCTX": 8, "DIRENT": 24,
    "DIRENTPLUS_HEAD": 152,
}

OPTS = FsOptions(shared_dir="/srv")
FLAGS_610 = 0x7BFFFFFB  # 6.1.0: bits 0-30 minus FILE_OPS and MAP_ALIGNMENT
FLAGS2_610 = 0x3  # SECURITY_CTX | HAS_INODE_DAX
FLAGS2_61192 = 0xB  # + HAS_EXPIRE_ONLY


@pytest.mark.parametrize(("name", "size"), sorted(SIZES.items()))
def test_struct_sizes(name, size):
    assert getattr(abi, name).size == size


def test_opcodes_match_enum_fuse_opcode():
    assert Opcode.LOOKUP == 1 and Opcode.MKNOD == 8 and Opcode.FSYNC == 20
    assert Opcode.INIT == 26 and Opcode.DESTROY == 38 and Opcode.BATCH_FORGET == 42
    assert Opcode.READDIRPLUS == 44 and Opcode.SYNCFS == 50 and Opcode.TMPFILE == 51
    assert Opcode.CUSE_INIT == 4096
    assert 7 not in Opcode._value2member_map_ and 19 not in Opcode._value2member_map_


def test_fh_opcodes_are_exactly_the_routed_set():
    assert {int(o) for o in abi.FH_OPCODES} == {
        15, 16, 25, 18, 20, 28, 44, 29, 30, 31, 32, 33, 46, 43, 47, 39, 40,
    }


def test_flag_values():
    assert F.INIT_EXT == 0x40000000 and F.MAX_PAGES == 0x400000
    assert F.SECURITY_CTX == 1 << 32 and F.HAS_EXPIRE_ONLY == 1 << 35
    assert abi.FATTR_FH == 64 and abi.FATTR_MTIME_NOW == 256 and abi.FATTR_KILL_SUIDGID == 2048
    assert abi.FOPEN_DIRECT_IO == 1 and abi.FOPEN_KEEP_CACHE == 2 and abi.FOPEN_CACHE_DIR == 8
    assert abi.split_init_flags(int(F.ASYNC_READ | F.SECURITY_CTX)) == (1, 1)


def test_golden_headers():
    raw = abi.IN_HEADER_38.pack(48, 2, 0x10, 3, 1000, 100, 77, 1, 0)
    assert raw.hex() == (
        "30000000" "02000000" "1000000000000000" "0300000000000000"
        "e8030000" "64000000" "4d000000" "0100" "0000"
    )
    # 7.37 view of the same bytes: total_extlen|padding is one u32
    assert abi.IN_HEADER.unpack(raw)[7] == 1
    assert abi.OUT_HEADER.pack(16, -2, 0x10).hex() == "10000000feffffff1000000000000000"


def test_golden_init_out_minimal_reply():
    # PROTOCOLS.md D.4: the minimal reply verified live.
    raw = abi.INIT_OUT.pack(7, 38, 131072, 0x40400021, 0, 0, 131072, 1, 32, 0, 1)
    assert raw[:36].hex() == (
        "07000000" "26000000" "00000200" "21004040" "0000" "0000" "00000200"
        "01000000" "2000" "0000" "01000000"
    )
    assert raw[36:] == bytes(28)


def test_golden_dirent_and_sizes():
    rec = abi.DIRENT.pack(5, 7, 3, 8) + b"abc" + bytes(5)
    assert len(rec) == abi.dirent_size(3) == 32
    assert abi.dirent_size(8) == 32 and abi.dirent_size(9) == 40
    assert abi.direntplus_size(1) == 160 and abi.direntplus_size(8) == 160


def test_signed_times_share_layout():
    raw = abi.ATTR.pack(1, 2, 3, -1, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096, 0)
    assert raw[24:32] == b"\xff" * 8  # two's complement, as the kernel reads it


def _init_in(minor, flags, flags2=0, major=7):
    return abi.INIT_IN.pack(major, minor, 131072, flags, flags2)


@pytest.mark.parametrize(
    ("minor", "flags2"), [(37, FLAGS2_610), (38, FLAGS2_61192), (39, FLAGS2_61192)]
)
def test_negotiate_linux_61(minor, flags2):
    body, s = negotiate(_init_in(minor, FLAGS_610, flags2), OPTS)
    major, rminor, ra, out_flags, bg, cong, max_write, gran, pages, align, out_flags2 = (
        abi.INIT_OUT.unpack(body)
    )
    assert len(body) == 64
    assert (major, rminor) == (7, min(minor, 38))
    assert ra == 131072 and max_write == MAX_WRITE == 1 << 20 and pages == MAX_PAGES == 256
    assert gran == 1 and align == 0 and bg > 0 and cong <= bg
    wanted = (F.ASYNC_READ | F.BIG_WRITES | F.MAX_PAGES | F.INIT_EXT | F.PARALLEL_DIROPS
              | F.AUTO_INVAL_DATA | F.DO_READDIRPLUS | F.READDIRPLUS_AUTO | F.EXPORT_SUPPORT
              | F.ATOMIC_O_TRUNC | F.DONT_MASK | F.CACHE_SYMLINKS | F.POSIX_LOCKS
              | F.FLOCK_LOCKS)
    assert out_flags == int(wanted)
    assert out_flags2 == 0  # SECURITY_CTX only with security_label
    assert not out_flags & (F.WRITEBACK_CACHE | F.NO_OPEN_SUPPORT | F.SETXATTR_EXT)
    assert s.minor == min(minor, 38) and s.flags == out_flags
    assert s.kernel_flags == FLAGS_610 | flags2 << 32
    assert s.has_extlen == (minor >= 38)


def test_negotiate_only_what_the_kernel_offers():
    offered = int(F.ASYNC_READ | F.MAX_PAGES | F.WRITEBACK_CACHE)
    body, s = negotiate(_init_in(38, offered), OPTS)
    assert abi.INIT_OUT.unpack(body)[3] == int(F.ASYNC_READ | F.MAX_PAGES)
    assert not s.has(F.INIT_EXT)


def test_negotiate_options():
    flags = FLAGS_610 | F.WRITEBACK_CACHE
    _, s = negotiate(_init_in(38, flags, 0xB), FsOptions("/x", cache="never", readdirplus=False,
                                                         writeback=True))
    assert not s.has(F.CACHE_SYMLINKS) and not s.has(F.DO_READDIRPLUS)
    assert s.has(F.WRITEBACK_CACHE)
    _, s = negotiate(_init_in(38, flags), FsOptions("/x", writeback=True, readonly=True))
    assert not s.has(F.WRITEBACK_CACHE)


@pytest.mark.parametrize(
    ("option", "value", "flag"),
    [
        ("posix_lock", False, F.POSIX_LOCKS),
        ("flock", False, F.FLOCK_LOCKS),
        ("posix_acl", True, F.POSIX_ACL),
        ("posix_acl", True, F.SETXATTR_EXT),
        ("xattr", True, F.SETXATTR_EXT),
        ("security_label", True, F.SECURITY_CTX),
        ("killpriv_v2", True, F.HANDLE_KILLPRIV_V2),
        ("announce_submounts", True, F.SUBMOUNTS),
        ("writeback", True, F.WRITEBACK_CACHE),
        ("readdirplus", False, F.DO_READDIRPLUS),
        ("cache", "never", F.CACHE_SYMLINKS),
    ],
)
def test_each_option_changes_the_init_reply(option, value, flag):
    """An option the negotiation ignored would leave its INIT flag as the default has it."""
    offered = FLAGS_610 | F.WRITEBACK_CACHE
    _, default = negotiate(_init_in(38, offered, FLAGS2_61192), OPTS)
    _, changed = negotiate(_init_in(38, offered, FLAGS2_61192),
                           FsOptions("/x", **{option: value}))
    assert default.has(flag) != changed.has(flag)
    _, out_flags2 = abi.split_init_flags(changed.flags)
    if flag == F.SECURITY_CTX:
        assert out_flags2 == 1


def test_negotiate_pre_736_body_without_flags2():
    body, s = negotiate(abi.INIT_IN_COMPAT.pack(7, 31, 65536, 0x3FFFFFFB), OPTS)
    assert abi.INIT_OUT.unpack(body)[1] == 31
    assert s.kernel_flags == 0x3FFFFFFB and not s.has(F.INIT_EXT)


def test_flags2_ignored_without_init_ext():
    _, s = negotiate(_init_in(38, FLAGS_610 & ~F.INIT_EXT, 0xFF), OPTS)
    assert s.kernel_flags >> 32 == 0


@pytest.mark.parametrize(
    ("raw", "err"),
    [
        (_init_in(38, 0, major=8), errno.EPROTO),
        (_init_in(38, 0, major=6), errno.EPROTO),
        (_init_in(26, 0), errno.EPROTO),
        (abi.INIT_IN.pack(abi.FUSE_INIT_BSWAP_RESERVED, 0, 0, 0, 0), errno.EPROTO),
        (b"\x07\x00\x00\x00", errno.EINVAL),
    ],
)
def test_negotiate_refuses(raw, err):
    with pytest.raises(InitError) as ei:
        negotiate(raw, OPTS)
    assert ei.value.errno_hint == err
    # The supervisor answers `except OSError` with e.errno; an InitError that was not an
    # OSError went past it and stopped the daemon (found by tests/daemon/test_hostile.py).
    assert isinstance(ei.value, OSError) and ei.value.errno == err


def test_session_round_trips_through_orjson():
    _, s = negotiate(_init_in(38, FLAGS_610, FLAGS2_61192), OPTS)
    again = Session.from_dict(orjson.loads(orjson.dumps(s.to_dict())))
    assert again == s
    with pytest.raises(AttributeError):
        s.minor = 1  # frozen


def test_options_validate_and_map_cache_modes():
    with pytest.raises(ValueError):
        FsOptions("/x", cache="sometimes")
    with pytest.raises(ValueError):
        FsOptions("")
    with pytest.raises(ValueError, match="allow_devices"):
        FsOptions("/x", allow_devices="some")
    assert FsOptions("/x", cache="never").timeout == 0
    assert FsOptions("/x", cache="never").file_open_flags == abi.FOPEN_DIRECT_IO
    assert FsOptions("/x").timeout == 1.0 and FsOptions("/x").file_open_flags == 0
    assert FsOptions("/x", cache="always").file_open_flags == abi.FOPEN_KEEP_CACHE
    assert FsOptions("/x", cache="always").dir_open_flags == abi.FOPEN_CACHE_DIR
    o = FsOptions("/x")
    assert (o.xattr, o.readonly, o.allow_devices, o.writeback, o.readdirplus) == (
        False, False, "all", False, True)
