"""FuseServer + PassthroughFs driven with request bytes over a temporary export (as root)."""

import errno
import os
import stat

import pytest
from fusereq import (
    INIT_FLAGS_61,
    FuseClient,
    attr,
    buffers,
    build,
    chunks,
    entry,
    joined,
    open_fh,
    parse_dirents,
    secctx_ext,
)

from vfsd.dispatch.fh import make_fh
from vfsd.fs.inode_table import ROOT_ID, InodeTable
from vfsd.fuse import abi
from vfsd.fuse.abi import InitFlags, Opcode
from vfsd.fuse.options import FsOptions
from workers.passthrough.fs import ExportError, PassthroughFs
from workers.server import FuseServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (file handles, creds)")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Rig:
    def __init__(self, tmp_path, **opts):
        self.root = tmp_path / "export"
        self.root.mkdir(exist_ok=True)
        os.chmod(self.root, 0o777)
        self.outside = tmp_path / "outside"
        self.outside.mkdir(exist_ok=True)
        (self.outside / "secret").write_bytes(b"top secret")
        self.table = InodeTable.create(4096)
        self.options = FsOptions(shared_dir=str(self.root), **opts)
        self.fs = PassthroughFs(self.options, self.table, 0)
        self.server = FuseServer(self.fs, self.options, on_destroy=self.table.clear)
        self.c = FuseClient(self.server)
        r = self.c.init()
        assert r.error == 0

    def host(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def close(self):
        self.server.close()
        self.fs.close()
        self.table.close()

    # helpers returning decoded values
    def lookup(self, parent, name) -> int:
        return entry(self.c.lookup(parent, name))[0]

    def create(self, parent, name, flags=os.O_RDWR, **kw):
        r = self.c.create(parent, name, flags, **kw)
        nodeid, _ = entry(r)
        return nodeid, open_fh(r, 128)[0]

    def mkdir(self, parent, name, **kw) -> int:
        return entry(self.c.mkdir(parent, name, **kw))[0]

    def readdir_all(self, nodeid, fh, plus=False, size=4096):
        out, off = [], 0
        while True:
            r = self.c.readdir(nodeid, fh, off, size, plus)
            assert r.error == 0, os.strerror(r.error)
            ents = parse_dirents(r.body, plus)
            if not ents:
                return out
            out += ents
            off = ents[-1].off


@pytest.fixture
def rig(tmp_path):
    before = open_fds()
    r = Rig(tmp_path)
    yield r
    r.close()
    assert open_fds() <= before, "file descriptors leaked"


def make_rig(tmp_path, **opts):
    return Rig(tmp_path, **opts)


# ----------------------------------------------------------------------------- basics
def test_init_and_root_getattr(rig):
    a = attr(rig.c.getattr(ROOT_ID))
    st = os.stat(rig.root)
    assert a[0] == st.st_ino and stat.S_ISDIR(a[9])
    assert rig.server.session.minor == 38


def test_export_without_root_dir_is_a_startup_error(tmp_path):
    table = InodeTable.create(16)
    with pytest.raises(ExportError):
        PassthroughFs(FsOptions(shared_dir=str(tmp_path / "missing")), table)
    table.close()


def test_lookup_counts_and_negative_entries(rig):
    open(rig.host("f"), "w").close()
    n = rig.lookup(ROOT_ID, b"f")
    assert n not in (0, ROOT_ID)
    assert rig.lookup(ROOT_ID, b"f") == n
    assert rig.table.get(n).nlookup == 2
    neg = rig.c.lookup(ROOT_ID, b"missing")
    assert neg.error == 0 and entry(neg)[0] == 0  # cached negative entry (cache=auto)
    assert abi.ENTRY_OUT.unpack_from(neg.body)[2] == 1  # entry_valid 1 s


def test_lookup_enoent_without_cache(tmp_path):
    r = make_rig(tmp_path, cache="never")
    try:
        assert r.c.lookup(ROOT_ID, b"missing").error == errno.ENOENT
        n, _ = r.create(ROOT_ID, b"f")
        assert open_fh(r.c.open(n), 0)[1] == abi.FOPEN_DIRECT_IO
    finally:
        r.close()


def test_dot_and_dotdot(rig):
    os.mkdir(rig.host("d"))
    d = rig.lookup(ROOT_ID, b"d")
    assert rig.lookup(ROOT_ID, b".") == ROOT_ID
    assert rig.lookup(ROOT_ID, b"..") == ROOT_ID  # never above the export
    assert rig.lookup(d, b"..") == ROOT_ID
    assert rig.lookup(d, b".") == d
    open(rig.host("d", "f"), "w").close()
    f = rig.lookup(d, b"f")
    assert rig.lookup(f, b".") == f  # EXPORT_SUPPORT: "." revalidates any nodeid
    assert rig.table.get(f).nlookup == 2


@pytest.mark.parametrize(
    ("name", "err"),
    [(b"a/b", errno.EINVAL), (b"", errno.EINVAL), (b"x" * 256, errno.ENAMETOOLONG),
     (b"/", errno.EINVAL), (b"../outside", errno.EINVAL)],
)
def test_bad_names_in_lookup(rig, name, err):
    assert rig.c.lookup(ROOT_ID, name).error == err


@pytest.mark.parametrize("name", [b".", b"..", b"a/b", b""])
def test_bad_names_in_creating_ops(rig, name):
    assert rig.c.mkdir(ROOT_ID, name).error == errno.EINVAL
    assert rig.c.create(ROOT_ID, name).error == errno.EINVAL
    assert rig.c.symlink(ROOT_ID, name, b"t").error == errno.EINVAL
    assert rig.c.unlink(ROOT_ID, name).error == errno.EINVAL
    assert rig.c.rename(ROOT_ID, name, ROOT_ID, b"x").error == errno.EINVAL


def test_name_of_255_bytes_is_fine(rig):
    assert rig.c.mkdir(ROOT_ID, b"n" * 255).error == 0
    assert rig.c.mkdir(ROOT_ID, b"n" * 256).error == errno.ENAMETOOLONG


def test_name_without_nul_is_einval(rig):
    assert rig.c.call(Opcode.LOOKUP, ROOT_ID, b"abc").error == errno.EINVAL


# ----------------------------------------------------------------------------- safety
def test_symlinks_are_never_followed(rig):
    os.symlink(str(rig.outside), rig.host("escape_dir"))
    os.symlink(str(rig.outside / "secret"), rig.host("escape_file"))
    ld = rig.lookup(ROOT_ID, b"escape_dir")
    lf = rig.lookup(ROOT_ID, b"escape_file")
    assert stat.S_ISLNK(attr(rig.c.getattr(lf))[9])
    assert rig.c.call(Opcode.READLINK, lf).body == str(rig.outside / "secret").encode()
    # Using the link as a directory or opening it must fail, not reach outside.
    assert rig.c.lookup(ld, b"secret").error == errno.ENOTDIR
    assert rig.c.mkdir(ld, b"planted").error == errno.ENOTDIR
    assert rig.c.create(ld, b"planted").error == errno.ENOTDIR
    assert rig.c.opendir(ld).error == errno.ENOTDIR
    assert rig.c.open(lf).error == errno.ELOOP
    assert rig.c.open(lf, os.O_WRONLY | os.O_TRUNC).error == errno.ELOOP
    # CREATE over an existing symlink name must not open its target.
    assert rig.c.create(ROOT_ID, b"escape_file").error == errno.ELOOP
    # SETATTR on the link changes the link (or fails), never the target.
    before = os.stat(rig.outside / "secret")
    assert rig.c.setattr(lf, abi.FATTR_SIZE, size=0).error == errno.ELOOP
    assert rig.c.setattr(lf, abi.FATTR_MODE, mode=0o777).error == errno.EOPNOTSUPP
    assert rig.c.setattr(lf, abi.FATTR_MTIME, mtime=12345).error == 0
    assert rig.c.setattr(lf, abi.FATTR_UID | abi.FATTR_GID, uid=4321, gid=4321).error == 0
    after = os.stat(rig.outside / "secret")
    assert (after.st_size, after.st_mode, after.st_mtime_ns, after.st_uid) == (
        before.st_size, before.st_mode, before.st_mtime_ns, before.st_uid)
    assert os.lstat(rig.host("escape_file")).st_uid == 4321
    # A hard link of the symlink is a symlink, not the target.
    assert entry(rig.c.link(lf, ROOT_ID, b"hl"))[0] == lf
    assert os.path.islink(rig.host("hl"))
    assert os.listdir(rig.outside) == ["secret"]
    assert (rig.outside / "secret").read_bytes() == b"top secret"


def test_symlink_op_creates_link_without_following(rig):
    n = entry(rig.c.symlink(ROOT_ID, b"l", str(rig.outside).encode()))[0]
    assert os.readlink(rig.host("l")) == str(rig.outside)
    assert rig.c.symlink(ROOT_ID, b"e", b"").error == errno.ENOENT
    assert rig.c.symlink(ROOT_ID, b"e", b"x" * 4096).error == errno.ENAMETOOLONG
    assert stat.S_ISLNK(attr(rig.c.getattr(n))[9])


# ----------------------------------------------------------------------------- framing
def test_truncated_and_malformed_requests(rig):
    s = rig.server
    wr = buffers(16 + 256)
    # Less than a header: nothing to answer to.
    assert s.handle(chunks(b"\x00" * 30), wr) == 0
    assert s.handle([], wr) == 0
    # Body shorter than the op's struct.
    r = rig.c.call(Opcode.GETATTR, ROOT_ID, b"\0" * 8)
    assert r.error == errno.EINVAL
    # in.len larger than the buffer we got.
    r = rig.c.call(Opcode.GETATTR, ROOT_ID, abi.GETATTR_IN.pack(0, 0, 0), length=40 + 16 + 100)
    assert r.error == errno.EINVAL
    # in.len shorter than the header.
    assert rig.c.call(Opcode.GETATTR, ROOT_ID, bytes(16), length=20).error == errno.EINVAL
    # Extension length beyond the request.
    body = abi.GETATTR_IN.pack(0, 0, 0)
    req = bytearray(build(Opcode.GETATTR, ROOT_ID, body))
    req[36] = 10
    n = s.handle(chunks(req), wr)
    assert n == 16 and abi.OUT_HEADER.unpack_from(wr[0])[1] == -errno.EINVAL


def test_unknown_and_unimplemented_opcodes(rig):
    assert rig.c.call(999, ROOT_ID).error == errno.ENOSYS
    assert rig.c.call(Opcode.POLL, ROOT_ID, bytes(24)).error == errno.ENOSYS
    assert rig.c.call(Opcode.BMAP, ROOT_ID, bytes(16)).error == errno.ENOSYS
    # O_TMPFILE without write access is EINVAL (as open(2)); a foreign fh is EBADF
    assert rig.c.call(Opcode.TMPFILE, ROOT_ID, bytes(16) + b"/\0").error == errno.EINVAL
    assert rig.c.call(Opcode.GETLK, ROOT_ID, bytes(48)).error == errno.EBADF
    assert rig.c.call(Opcode.IOCTL, ROOT_ID, bytes(32)).error == errno.ENOTTY
    assert rig.c.call(Opcode.SETXATTR, ROOT_ID, bytes(8) + b"user.a\0").error == errno.ENOSYS


def test_requests_before_init_fail_with_eio(tmp_path):
    table = InodeTable.create(16)
    os.mkdir(tmp_path / "e")
    opts = FsOptions(shared_dir=str(tmp_path / "e"))
    fs = PassthroughFs(opts, table)
    c = FuseClient(FuseServer(fs, opts))
    assert c.getattr(ROOT_ID).error == errno.EIO
    assert c.init(minor=20).error == errno.EPROTO
    assert c.init(minor=37).error == 0
    assert c.getattr(ROOT_ID).error == 0
    fs.close()
    table.close()


def test_reply_larger_than_writable_is_eio(rig):
    r = rig.c.call(Opcode.GETATTR, ROOT_ID, abi.GETATTR_IN.pack(0, 0, 0), out=50,
                   wcuts=[16, 30])
    assert r.error == errno.EIO
    # Not even room for a header: nothing written.
    wr = buffers(8, [])
    req = chunks(build(Opcode.GETATTR, ROOT_ID, abi.GETATTR_IN.pack(0, 0, 0)))
    assert rig.server.handle(req, wr) == 0


def test_any_descriptor_boundaries_give_the_same_reply(rig):
    open(rig.host("somefile"), "w").close()
    ref = rig.c.lookup(ROOT_ID, b"somefile")
    req_len = 40 + len(b"somefile") + 1
    for cut in range(1, req_len):
        r = rig.c.lookup(ROOT_ID, b"somefile", rcuts=[cut, min(cut + 3, req_len - 1)])
        assert r.body == ref.body
    for wcut in (1, 7, 16, 17, 100, 143):
        r = rig.c.lookup(ROOT_ID, b"somefile", wcuts=[wcut, wcut + 5])
        assert r.body == ref.body
    # One single descriptor holding everything.
    assert rig.c.lookup(ROOT_ID, b"somefile", rcuts=[], wcuts=[]).body == ref.body


# ----------------------------------------------------------------------------- 7.37/7.38
def test_creates_with_security_context_extension(rig):
    # 7.38: extension announced by total_extlen, at the end of the request.
    r = rig.c.call(Opcode.MKDIR, ROOT_ID, abi.MKDIR_IN.pack(0o755, 0) + b"d38\0",
                   ext=secctx_ext())
    assert r.error == 0 and os.path.isdir(rig.host("d38"))
    r = rig.c.call(Opcode.CREATE, ROOT_ID,
                   abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"f38\0",
                   ext=secctx_ext())
    assert r.error == 0
    assert sorted(os.listdir(rig.root)) == ["d38", "f38"]
    # Malformed extension chain.
    bad = rig.c.call(Opcode.MKDIR, ROOT_ID, abi.MKDIR_IN.pack(0o755, 0) + b"dx\0",
                     ext=abi.EXT_HEADER.pack(0, 0))
    assert bad.error == errno.EINVAL and not os.path.exists(rig.host("dx"))
    # 7.37: the block is appended silently after the name; names are parsed by NUL.
    r = rig.c.call(Opcode.SYMLINK, ROOT_ID, b"l37\0target\0" + secctx_ext())
    assert r.error == 0 and os.readlink(rig.host("l37")) == "target"


def test_session_minor_37_ignores_header_padding(tmp_path):
    r = make_rig(tmp_path)
    try:
        r.c.init(minor=37)
        assert r.server.session.minor == 37
        body = abi.MKDIR_IN.pack(0o755, 0) + b"d\0"
        req = bytearray(build(Opcode.MKDIR, ROOT_ID, body))
        req[36] = 1  # garbage in 7.37 padding must not be read as total_extlen
        wr = buffers(16 + 128)
        assert r.server.handle(chunks(req, [40]), wr) == 144
    finally:
        r.close()


# ----------------------------------------------------------------------------- errors
def test_common_errors(rig):
    os.mkdir(rig.host("d"))
    open(rig.host("d", "f"), "w").close()
    d = rig.lookup(ROOT_ID, b"d")
    f = rig.lookup(d, b"f")
    assert rig.c.mkdir(ROOT_ID, b"d").error == errno.EEXIST
    assert rig.c.rmdir(ROOT_ID, b"d").error == errno.ENOTEMPTY
    assert rig.c.open(d).error == errno.EISDIR
    assert rig.c.lookup(f, b"x").error == errno.ENOTDIR
    assert rig.c.unlink(ROOT_ID, b"missing").error == errno.ENOENT
    assert rig.c.rmdir(d, b"f").error == errno.ENOTDIR
    assert rig.c.unlink(ROOT_ID, b"d").error == errno.EISDIR
    assert rig.c.create(d, b"f", os.O_RDWR | os.O_EXCL).error == errno.EEXIST
    assert rig.c.read(f, make_fh(0, 999), 0, 10).error == errno.EBADF
    assert rig.c.read(f, make_fh(3, 1), 0, 10).error == errno.EBADF  # another worker's fh
    assert rig.c.release(f, make_fh(0, 999)).error == errno.EBADF
    dfh = open_fh(rig.c.opendir(d))[0]
    assert rig.c.read(d, dfh, 0, 10).error == errno.EISDIR
    _, ffh = rig.create(d, b"g")
    assert rig.c.readdir(d, ffh).error == errno.ENOTDIR


def test_forgotten_nodeid_is_stale(rig):
    open(rig.host("f"), "w").close()
    n = rig.lookup(ROOT_ID, b"f")
    assert rig.c.getattr(n).error == 0
    assert rig.c.call(Opcode.FORGET, n, abi.FORGET_IN.pack(1), writable=[]).written == 0
    assert not rig.table.is_live(n)
    assert rig.c.getattr(n).error == errno.ESTALE
    assert rig.c.getattr(0xDEAD0000BEEF).error == errno.ESTALE
    assert rig.fs.sweep() == 0  # the stale fd was already dropped on use


def test_batch_forget_and_sweep(rig):
    ids = []
    for i in range(3):
        open(rig.host(f"f{i}"), "w").close()
        ids.append(rig.lookup(ROOT_ID, b"f%d" % i))
    body = abi.BATCH_FORGET_IN.pack(3, 0) + b"".join(abi.FORGET_ONE.pack(n, 1) for n in ids)
    assert rig.c.call(Opcode.BATCH_FORGET, 0, body, writable=[]).written == 0
    assert rig.table.count() == 1
    # A worker that frees a nodeid itself closes its cached fd at once.
    assert len(rig.fs.inodes) == 0 and rig.fs.sweep() == 0


def test_nodeids_freed_elsewhere_close_when_told_or_swept(rig):
    """The supervisor frees nodeids (FORGET on hiprio) in the shared table: `forgotten`
    closes the named fds at once; `sweep` finds the ones nobody named."""
    ids = []
    for i in range(4):
        open(rig.host(f"f{i}"), "w").close()
        ids.append(rig.lookup(ROOT_ID, b"f%d" % i))
    assert len(rig.fs.inodes) == 4
    for n in ids:
        assert rig.table.forget(n, 1)  # as the supervisor does
    assert not rig.table.forget(ids[0], 1)  # already freed: nothing to tell
    assert rig.fs.forgotten([*ids[:3], ids[0] + 12345]) == 3
    assert len(rig.fs.inodes) == 1
    assert rig.fs.sweep() == 1 and len(rig.fs.inodes) == 0


# ----------------------------------------------------------------------------- directories
def test_readdir_2000_entries_with_stable_cookies(rig):
    names = {b"file-%04d" % i for i in range(2000)}
    for n in names:
        open(os.path.join(rig.root, n.decode()), "w").close()
    fh = open_fh(rig.c.opendir(ROOT_ID))[0]
    ents = rig.readdir_all(ROOT_ID, fh)
    got = [e.name for e in ents]
    assert set(got) == names | {b".", b".."} and len(got) == len(set(got))
    assert all(e.off != 0 for e in ents)
    assert all(e.type == stat.S_IFREG >> 12 for e in ents if e.name.startswith(b"file"))
    # Resume from a cookie in the middle, with another handle and a different size.
    mid = ents[777]
    fh2 = open_fh(rig.c.opendir(ROOT_ID))[0]
    again = []
    off = mid.off
    while True:
        part = parse_dirents(rig.c.readdir(ROOT_ID, fh2, off, 1000).body)
        if not part:
            break
        again += part
        off = part[-1].off
    assert again == ents[778:]
    # Offset 0 rewinds.
    assert parse_dirents(rig.c.readdir(ROOT_ID, fh, 0).body)[0] == ents[0]
    assert rig.c.release(ROOT_ID, fh, Opcode.RELEASEDIR).error == 0
    assert rig.c.release(ROOT_ID, fh2, Opcode.RELEASEDIR).error == 0
    assert rig.c.release(ROOT_ID, fh2, Opcode.RELEASEDIR).error == errno.EBADF


def test_readdir_never_splits_records_and_tiny_buffer_is_einval(rig):
    for i in range(50):
        open(rig.host("x" * (i % 30 + 1) + str(i)), "w").close()
    fh = open_fh(rig.c.opendir(ROOT_ID))[0]
    r = rig.c.readdir(ROOT_ID, fh, 0, 333)
    assert len(r.body) <= 333 and parse_dirents(r.body)
    assert rig.c.readdir(ROOT_ID, fh, 0, 20).error == errno.EINVAL


def test_readdirplus_counts_lookups(rig):
    for i in range(30):
        open(rig.host(f"e{i}"), "w").close()
    os.mkdir(rig.host("sub"))
    fh = open_fh(rig.c.opendir(ROOT_ID))[0]
    ents = rig.readdir_all(ROOT_ID, fh, plus=True)
    assert len(ents) == 33
    dots = [e for e in ents if e.name in (b".", b"..")]
    assert len(dots) == 2 and all(e.nodeid == 0 for e in dots)
    real = [e for e in ents if e.name not in (b".", b"..")]
    assert all(e.nodeid not in (0, ROOT_ID) for e in real)
    assert all(rig.table.get(e.nodeid).nlookup == 1 for e in real)
    assert rig.table.count() == 1 + 31
    for e in real:
        assert e.attr[0] == e.ino and e.attr[9] == os.lstat(rig.host(e.name.decode())).st_mode
    # a second pass adds one more lookup each, same nodeids
    again = rig.readdir_all(ROOT_ID, fh, plus=True)
    assert [e.nodeid for e in again] == [e.nodeid for e in ents]
    assert all(rig.table.get(e.nodeid).nlookup == 2 for e in real)
    assert rig.lookup(ROOT_ID, b"e3") == next(e.nodeid for e in real if e.name == b"e3")


def test_readdirplus_only_refs_what_fits(rig):
    for i in range(100):
        open(rig.host(f"name{i:03d}"), "w").close()
    fh = open_fh(rig.c.opendir(ROOT_ID))[0]
    r = rig.c.readdir(ROOT_ID, fh, 0, 4096, plus=True)
    ents = parse_dirents(r.body, plus=True)
    assert len(r.body) <= 4096 and len(ents) < 100
    refs = sum(1 for e in ents if e.nodeid)
    assert rig.table.count() == 1 + refs


def test_fsyncdir_and_dir_fopen_flags(tmp_path):
    r = make_rig(tmp_path, cache="always")
    try:
        fh, flags = open_fh(r.c.opendir(ROOT_ID))
        assert flags == abi.FOPEN_CACHE_DIR
        assert r.c.call(Opcode.FSYNCDIR, ROOT_ID, abi.FSYNC_IN.pack(fh, 1, 0)).error == 0
        n, _ = r.create(ROOT_ID, b"f")
        assert open_fh(r.c.open(n), 0)[1] == abi.FOPEN_KEEP_CACHE
    finally:
        r.close()


# ----------------------------------------------------------------------------- files
def test_zero_copy_read_write_over_fragments(rig):
    n, fh = rig.create(ROOT_ID, b"data")
    payload = os.urandom(10000)
    # WRITE: header, write_in, then the payload cut into odd page-like pieces.
    cuts = [40, 80, 81, 4096 + 80, 9000]
    r = rig.c.write(n, fh, 0, payload, rcuts=cuts)
    assert r.error == 0 and abi.WRITE_OUT.unpack(r.body)[0] == 10000
    with open(rig.host("data"), "rb") as f:
        assert f.read() == payload
    # READ: capture the buffers handed to preadv: they must be slices of guest buffers.
    seen = []
    real_read = rig.fs.read

    def spy(nodeid, fh_, offset, bufs):
        seen.extend(bufs)
        return real_read(nodeid, fh_, offset, bufs)

    rig.fs.read = spy
    wr = buffers(16 + 10000, [3, 16, 17, 5000, 8193])
    rig.c.call(Opcode.READ, n, abi.READ_IN.pack(fh, 0, 10000, 0, 0, 0, 0), writable=wr)
    out = joined(wr)
    assert abi.OUT_HEADER.unpack_from(out)[:2] == (16 + 10000, 0)
    assert out[16:] == payload
    assert all(isinstance(b, memoryview) for b in seen)
    assert {id(b.obj) for b in seen} <= {id(w.obj) for w in wr}
    # Short read at EOF: out.len says how much.
    r = rig.c.read(n, fh, 9990, 100)
    assert r.body == payload[9990:]


def test_write_size_beyond_request_is_einval(rig):
    n, fh = rig.create(ROOT_ID, b"f")
    body = abi.WRITE_IN.pack(fh, 0, 100, 0, 0, 0, 0) + b"x" * 10
    assert rig.c.call(Opcode.WRITE, n, body).error == errno.EINVAL
    assert os.path.getsize(rig.host("f")) == 0


def test_o_append(rig):
    with open(rig.host("log"), "wb") as f:
        f.write(b"abc")
    n = rig.lookup(ROOT_ID, b"log")
    fh = open_fh(rig.c.open(n, os.O_WRONLY | os.O_APPEND | 0o100000))[0]  # + O_LARGEFILE
    assert rig.c.write(n, fh, 0, b"def").error == 0
    with open(rig.host("log"), "rb") as f:
        assert f.read() == b"abcdef"
    assert rig.c.read(n, fh, 0, 3).error == errno.EBADF  # write-only stays write-only


def test_writeback_session_upgrades_write_only_and_drops_append(tmp_path):
    r = make_rig(tmp_path, writeback=True)
    try:
        r.c.init(flags=INIT_FLAGS_61 | int(InitFlags.WRITEBACK_CACHE))
        assert r.server.session.has(InitFlags.WRITEBACK_CACHE)
        with open(r.host("f"), "wb") as f:
            f.write(b"hello")
        n = r.lookup(ROOT_ID, b"f")
        fh = open_fh(r.c.open(n, os.O_WRONLY | os.O_APPEND))[0]
        assert r.c.read(n, fh, 0, 5).body == b"hello"
        r.c.write(n, fh, 1, b"E")
        with open(r.host("f"), "rb") as f:
            assert f.read() == b"hEllo"
    finally:
        r.close()


def test_open_trunc_flush_fsync_release(rig):
    with open(rig.host("f"), "wb") as f:
        f.write(b"content")
    n = rig.lookup(ROOT_ID, b"f")
    fh = open_fh(rig.c.open(n, os.O_RDWR | os.O_TRUNC))[0]
    assert os.path.getsize(rig.host("f")) == 0
    assert rig.c.call(Opcode.FLUSH, n, abi.FLUSH_IN.pack(fh, 0, 0, 0)).error == 0
    assert rig.c.call(Opcode.FSYNC, n, abi.FSYNC_IN.pack(fh, 0, 0)).error == 0
    assert rig.c.call(Opcode.FSYNC, n, abi.FSYNC_IN.pack(fh, 1, 0)).error == 0
    assert rig.c.release(n, fh).error == 0
    assert rig.c.release(n, fh).error == errno.EBADF
    assert len(rig.fs.handles) == 0


def test_unlinked_open_file_stays_readable(rig):
    n, fh = rig.create(ROOT_ID, b"tmp")
    rig.c.write(n, fh, 0, b"still here")
    assert rig.c.unlink(ROOT_ID, b"tmp").error == 0
    assert rig.c.read(n, fh, 0, 100).body == b"still here"
    assert attr(rig.c.getattr(n, fh))[10] == 0  # nlink


def test_create_existing_without_excl_and_fifo(rig):
    with open(rig.host("f"), "wb") as f:
        f.write(b"old")
    os.chmod(rig.host("f"), 0o600)
    n, _ = rig.create(ROOT_ID, b"f", os.O_RDWR | os.O_TRUNC)
    assert os.path.getsize(rig.host("f")) == 0
    assert rig.lookup(ROOT_ID, b"f") == n
    # Someone else may not open it for writing through CREATE.
    assert rig.c.create(ROOT_ID, b"f", os.O_WRONLY, uid=1000, gid=1000).error == errno.EACCES
    os.mkfifo(rig.host("fifo"))
    assert rig.c.create(ROOT_ID, b"fifo", os.O_WRONLY).error == errno.ENXIO  # not blocked
    os.mkdir(rig.host("dir"))
    assert rig.c.create(ROOT_ID, b"dir").error == errno.EISDIR


def test_create_keeps_the_created_inode_when_the_name_is_replaced(rig, monkeypatch):
    """CREATE resolves its new name again for the O_PATH fd it caches; if a host process
    replaced the name in between, the entry must still be the file the guest holds open."""
    import workers.passthrough.fs as fsmod

    real_open = os.open

    def racing_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & os.O_PATH and path == b"raced" and dir_fd is not None:
            os.rename(rig.host("raced"), rig.host("moved"))
            with open(rig.host("raced"), "wb") as f:
                f.write(b"impostor")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(fsmod.os, "open", racing_open)
    nodeid, fh = rig.create(ROOT_ID, b"raced")
    monkeypatch.undo()
    assert rig.c.write(nodeid, fh, 0, b"mine").error == 0
    st = os.stat(rig.host("moved"))
    assert attr(rig.c.getattr(nodeid))[0] == st.st_ino != os.stat(rig.host("raced")).st_ino
    assert rig.lookup(ROOT_ID, b"moved") == nodeid  # one nodeid for the inode
    assert rig.lookup(ROOT_ID, b"raced") != nodeid
    with open(rig.host("moved"), "rb") as f:
        assert f.read() == b"mine"


# ----------------------------------------------------------------------------- creds
def test_created_files_belong_to_the_caller(rig):
    kw = {"uid": 1234, "gid": 5678}
    n = entry(rig.c.mkdir(ROOT_ID, b"d", 0o777, **kw))[0]
    assert attr(rig.c.getattr(n))[11:13] == (1234, 5678)
    r = rig.c.create(ROOT_ID, b"f", **kw)
    assert entry(r)[1][11:13] == (1234, 5678)
    rig.c.mknod(ROOT_ID, b"p", stat.S_IFIFO | 0o644, **kw)
    rig.c.symlink(ROOT_ID, b"l", b"target", **kw)
    for name in ("d", "f", "p", "l"):
        st = os.lstat(rig.host(name))
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
    assert os.geteuid() == 0 and os.getegid() == 0  # restored


def test_host_checks_parent_permissions_as_the_caller(rig):
    os.mkdir(rig.host("private"), 0o755)
    p = rig.lookup(ROOT_ID, b"private")
    assert rig.c.mkdir(p, b"x", uid=1000, gid=1000).error == errno.EACCES
    assert rig.c.create(p, b"x", uid=1000, gid=1000).error == errno.EACCES
    assert rig.c.mkdir(p, b"x").error == 0  # root may
    assert os.geteuid() == 0


def test_umask_applied_only_with_dont_mask(rig):
    assert rig.server.session.has(InitFlags.DONT_MASK)
    rig.c.mkdir(ROOT_ID, b"m", 0o777, umask=0o027)
    assert stat.S_IMODE(os.stat(rig.host("m")).st_mode) == 0o750
    rig.c.create(ROOT_ID, b"c", mode=0o666, umask=0o022)
    assert stat.S_IMODE(os.stat(rig.host("c")).st_mode) == 0o644


def test_umask_left_to_the_kernel_without_dont_mask(tmp_path):
    r = make_rig(tmp_path)
    try:
        r.c.init(flags=INIT_FLAGS_61 & ~int(InitFlags.DONT_MASK))
        r.c.mkdir(ROOT_ID, b"m", 0o777, umask=0o027)
        assert stat.S_IMODE(os.stat(r.host("m")).st_mode) == 0o777
    finally:
        r.close()


# ----------------------------------------------------------------------------- namespace
def test_mknod_types_and_devices(rig):
    """By default (allow_devices: all, as virtiofsd) device nodes are made with the guest's
    numbers; allow_devices' other modes: test_passthrough_options.test_allow_devices."""
    assert rig.c.mknod(ROOT_ID, b"fifo", stat.S_IFIFO | 0o600).error == 0
    assert stat.S_ISFIFO(os.lstat(rig.host("fifo")).st_mode)
    assert rig.c.mknod(ROOT_ID, b"sock", stat.S_IFSOCK | 0o600).error == 0
    assert stat.S_ISSOCK(os.lstat(rig.host("sock")).st_mode)
    assert rig.c.mknod(ROOT_ID, b"reg", stat.S_IFREG | 0o600).error == 0
    assert rig.c.mknod(ROOT_ID, b"dir", stat.S_IFDIR | 0o755).error == errno.EINVAL
    # new_encode_dev(MKDEV(1, 3)) and a minor above 255
    assert rig.c.mknod(ROOT_ID, b"null", stat.S_IFCHR | 0o666, (1 << 8) | 3).error == 0
    assert os.lstat(rig.host("null")).st_rdev == os.makedev(1, 3)
    enc = (0x2A & 0xFF) | (4 << 8) | ((0x12A & ~0xFF) << 12)
    assert rig.c.mknod(ROOT_ID, b"b", stat.S_IFBLK | 0o600, enc).error == 0
    assert os.lstat(rig.host("b")).st_rdev == os.makedev(4, 0x12A)
    fifo = rig.lookup(ROOT_ID, b"fifo")
    assert rig.c.open(fifo, os.O_RDONLY).error == errno.ENXIO  # never opened on the host
    null = rig.lookup(ROOT_ID, b"null")
    assert rig.c.open(null, os.O_RDONLY).error == errno.ENXIO  # nor is a device node


def test_hard_links_share_a_nodeid(rig):
    n, _ = rig.create(ROOT_ID, b"a")
    d = rig.mkdir(ROOT_ID, b"d")
    r = rig.c.link(n, d, b"b")
    nodeid, a = entry(r)
    assert nodeid == n and a[10] == 2
    assert rig.lookup(d, b"b") == n
    assert rig.table.get(n).nlookup == 3
    assert os.stat(rig.host("a")).st_ino == os.stat(rig.host("d", "b")).st_ino
    assert rig.c.link(d, ROOT_ID, b"dlink").error == errno.EPERM  # no directory links
    assert rig.c.link(n, d, b"b").error == errno.EEXIST


def test_rename_plain_noreplace_exchange(rig):
    for name, data in (("a", b"A"), ("b", b"B")):
        with open(rig.host(name), "wb") as f:
            f.write(data)
    d = rig.mkdir(ROOT_ID, b"d")
    assert rig.c.rename(ROOT_ID, b"a", d, b"a2").error == 0
    assert os.path.exists(rig.host("d", "a2")) and not os.path.exists(rig.host("a"))
    assert rig.c.rename(d, b"a2", ROOT_ID, b"b", abi.RENAME_NOREPLACE).error == errno.EEXIST
    assert rig.c.rename(d, b"a2", ROOT_ID, b"c", abi.RENAME_NOREPLACE).error == 0
    assert rig.c.rename(ROOT_ID, b"c", ROOT_ID, b"b", abi.RENAME_EXCHANGE).error == 0
    with open(rig.host("b"), "rb") as f:
        assert f.read() == b"A"
    with open(rig.host("c"), "rb") as f:
        assert f.read() == b"B"
    assert rig.c.rename(ROOT_ID, b"c", ROOT_ID, b"x", abi.RENAME_EXCHANGE).error == errno.ENOENT
    assert rig.c.rename(ROOT_ID, b"c", ROOT_ID, b"y", abi.RENAME_WHITEOUT).error == 0
    st = os.lstat(rig.host("c"))  # the whiteout: a 0:0 character device
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and os.path.exists(rig.host("y"))
    assert rig.c.rename(ROOT_ID, b"y", ROOT_ID, b"z", 8).error == errno.EINVAL
    assert rig.c.rename(ROOT_ID, b"missing", ROOT_ID, b"z").error == errno.ENOENT


def test_unlink_rmdir(rig):
    rig.mkdir(ROOT_ID, b"d")
    rig.create(ROOT_ID, b"f")
    assert rig.c.rmdir(ROOT_ID, b"d").error == 0
    assert rig.c.unlink(ROOT_ID, b"f").error == 0
    assert os.listdir(rig.root) == []


# ----------------------------------------------------------------------------- attributes
def test_setattr_mode_owner_size_times(rig):
    n, fh = rig.create(ROOT_ID, b"f")
    rig.c.write(n, fh, 0, b"0123456789")
    a = attr(rig.c.setattr(n, abi.FATTR_MODE, mode=stat.S_IFREG | 0o4751))
    assert stat.S_IMODE(a[9]) == 0o4751 and stat.S_ISREG(a[9])
    a = attr(rig.c.setattr(n, abi.FATTR_UID, uid=77))
    assert a[11:13] == (77, 0)
    a = attr(rig.c.setattr(n, abi.FATTR_GID, gid=88))
    assert a[11:13] == (77, 88)
    # size through the path (no fh) and through our fh
    assert attr(rig.c.setattr(n, abi.FATTR_SIZE, size=4))[1] == 4
    assert attr(rig.c.setattr(n, abi.FATTR_SIZE | abi.FATTR_FH, fh=fh, size=2))[1] == 2
    # an fh owned by another worker is only a hint
    other = make_fh(5, 1)
    assert attr(rig.c.setattr(n, abi.FATTR_SIZE | abi.FATTR_FH, fh=other, size=1))[1] == 1
    # explicit times with nanoseconds, and negative (pre-1970)
    a = attr(rig.c.setattr(n, abi.FATTR_ATIME | abi.FATTR_MTIME, atime=1000, atimensec=5,
                           mtime=-2, mtimensec=999_999_999))
    st = os.stat(rig.host("f"))
    assert st.st_atime_ns == 1000 * 10**9 + 5 and st.st_mtime_ns == -2 * 10**9 + 999_999_999
    assert (a[3], a[6], a[4], a[7]) == (1000, 5, -2, 999_999_999)
    # OMIT: only mtime given, atime untouched; NOW sets the current time
    rig.c.setattr(n, abi.FATTR_MTIME, mtime=5000)
    st2 = os.stat(rig.host("f"))
    assert st2.st_atime_ns == st.st_atime_ns and st2.st_mtime == 5000
    rig.c.setattr(n, abi.FATTR_ATIME | abi.FATTR_ATIME_NOW)
    assert os.stat(rig.host("f")).st_atime > 10**9
    assert os.stat(rig.host("f")).st_mtime == 5000
    d = rig.mkdir(ROOT_ID, b"d")
    assert rig.c.setattr(d, abi.FATTR_SIZE, size=0).error == errno.EISDIR


def test_getattr_with_fh(rig):
    n, fh = rig.create(ROOT_ID, b"f")
    rig.c.write(n, fh, 0, b"xyz")
    assert attr(rig.c.getattr(n, fh))[1] == 3
    assert attr(rig.c.getattr(n, make_fh(7, 7)))[1] == 3  # foreign fh: by nodeid


def test_access(rig):
    os.mkdir(rig.host("d"), 0o750)
    os.chown(rig.host("d"), 1000, 2000)
    d = rig.lookup(ROOT_ID, b"d")

    def access(mask, uid, gid):
        return rig.c.call(Opcode.ACCESS, d, abi.ACCESS_IN.pack(mask, 0), uid=uid,
                          gid=gid).error

    assert access(os.R_OK | os.W_OK | os.X_OK, 1000, 1) == 0
    assert access(os.R_OK | os.X_OK, 5, 2000) == 0
    assert access(os.W_OK, 5, 2000) == errno.EACCES
    assert access(os.R_OK, 5, 5) == errno.EACCES
    assert access(os.F_OK, 5, 5) == 0
    assert access(os.W_OK, 0, 0) == 0


def test_statfs(rig):
    r = rig.c.call(Opcode.STATFS, ROOT_ID)
    blocks, _, _, _, _, bsize, namelen, frsize, _ = abi.STATFS_OUT.unpack(r.body)
    sv = os.statvfs(rig.root)
    assert (blocks, bsize, namelen, frsize) == (sv.f_blocks, sv.f_bsize, sv.f_namemax,
                                                sv.f_frsize)


def test_lseek_fallocate_copy_file_range(rig):
    n, fh = rig.create(ROOT_ID, b"src")
    rig.c.write(n, fh, 0, b"hello world")
    r = rig.c.call(Opcode.LSEEK, n, abi.LSEEK_IN.pack(fh, 0, os.SEEK_DATA, 0))
    assert abi.LSEEK_OUT.unpack(r.body)[0] == 0
    assert rig.c.call(Opcode.FALLOCATE, n, abi.FALLOCATE_IN.pack(fh, 0, 65536, 0, 0)).error == 0
    assert os.path.getsize(rig.host("src")) == 65536
    m, fh2 = rig.create(ROOT_ID, b"dst")
    body = abi.COPY_FILE_RANGE_IN.pack(fh, 0, m, fh2, 3, 11, 0)
    r = rig.c.call(Opcode.COPY_FILE_RANGE, n, body)
    assert abi.WRITE_OUT.unpack(r.body)[0] == 11
    with open(rig.host("dst"), "rb") as f:
        assert f.read() == b"\0\0\0hello world"
    # The destination open in another worker: copied through a description of our own.
    body = abi.COPY_FILE_RANGE_IN.pack(fh, 6, m, make_fh(4, 1), 20, 5, 0)
    r = rig.c.call(Opcode.COPY_FILE_RANGE, n, body)
    assert abi.WRITE_OUT.unpack(r.body)[0] == 5
    with open(rig.host("dst"), "rb") as f:
        assert f.read() == b"\0\0\0hello world\0\0\0\0\0\0world"
    assert rig.c.call(Opcode.SYNCFS, ROOT_ID, bytes(8)).error == 0


# ----------------------------------------------------------------------------- options
def test_readonly_export(tmp_path):
    r = make_rig(tmp_path, readonly=True)
    try:
        with open(r.host("f"), "wb") as f:
            f.write(b"ro")
        n = r.lookup(ROOT_ID, b"f")
        assert r.c.mkdir(ROOT_ID, b"d").error == errno.EROFS
        assert r.c.create(ROOT_ID, b"g").error == errno.EROFS
        assert r.c.mknod(ROOT_ID, b"p", stat.S_IFIFO | 0o600).error == errno.EROFS
        assert r.c.symlink(ROOT_ID, b"l", b"t").error == errno.EROFS
        assert r.c.unlink(ROOT_ID, b"f").error == errno.EROFS
        assert r.c.rename(ROOT_ID, b"f", ROOT_ID, b"h").error == errno.EROFS
        assert r.c.link(n, ROOT_ID, b"h").error == errno.EROFS
        assert r.c.setattr(n, abi.FATTR_SIZE, size=0).error == errno.EROFS
        assert r.c.open(n, os.O_WRONLY).error == errno.EROFS
        assert r.c.open(n, os.O_RDONLY | os.O_TRUNC).error == errno.EROFS
        fh = open_fh(r.c.open(n, os.O_RDONLY))[0]
        assert r.c.read(n, fh, 0, 10).body == b"ro"
        assert r.c.write(n, fh, 0, b"x").error == errno.EROFS
        acc = r.c.call(Opcode.ACCESS, n, abi.ACCESS_IN.pack(os.W_OK, 0))
        assert acc.error == errno.EROFS
        assert os.listdir(r.root) == ["f"]
    finally:
        r.close()


def test_xattrs(tmp_path):
    r = make_rig(tmp_path, xattr=True)
    try:
        n, _ = r.create(ROOT_ID, b"f")
        assert r.server.session.has(InitFlags.SETXATTR_EXT)  # the 16-byte setxattr_in
        set_body = abi.SETXATTR_IN_EXT.pack(5, 0, 0, 0) + b"user.k\0" + b"value"
        assert r.c.call(Opcode.SETXATTR, n, set_body).error == 0
        assert os.getxattr(r.host("f"), "user.k") == b"value"
        probe = r.c.call(Opcode.GETXATTR, n, abi.GETXATTR_IN.pack(0, 0) + b"user.k\0")
        assert abi.GETXATTR_OUT.unpack(probe.body)[0] == 5
        got = r.c.call(Opcode.GETXATTR, n, abi.GETXATTR_IN.pack(64, 0) + b"user.k\0")
        assert got.body == b"value"
        small = r.c.call(Opcode.GETXATTR, n, abi.GETXATTR_IN.pack(2, 0) + b"user.k\0")
        assert small.error == errno.ERANGE
        missing = r.c.call(Opcode.GETXATTR, n, abi.GETXATTR_IN.pack(64, 0) + b"user.no\0")
        assert missing.error == errno.ENODATA
        lst = r.c.call(Opcode.LISTXATTR, n, abi.GETXATTR_IN.pack(256, 0))
        assert b"user.k\0" in lst.body
        assert r.c.call(Opcode.REMOVEXATTR, n, b"user.k\0").error == 0
        assert os.listxattr(r.host("f")) == []
        short = abi.SETXATTR_IN_EXT.pack(50, 0, 0, 0) + b"user.k\0" + b"value"
        assert r.c.call(Opcode.SETXATTR, n, short).error == errno.EINVAL
    finally:
        r.close()


def test_setxattr_with_unknown_flags_is_einval(tmp_path):
    # Found by fuzzing (tests/fuzz/fuzz_fuse_passthrough.py): flags >= 2^31 overflowed
    # os.setxattr's C int, and the server's catch-all answered EIO with a traceback.
    r = make_rig(tmp_path, xattr=True)
    try:
        n, _ = r.create(ROOT_ID, b"f")
        for flags in (1 << 31, 0xFFFFFFFF, 4):
            body = abi.SETXATTR_IN_EXT.pack(1, flags, 0, 0) + b"user.k\0v"
            assert r.c.call(Opcode.SETXATTR, n, body).error == errno.EINVAL, flags
        assert os.listxattr(r.host("f")) == []
    finally:
        r.close()


# ----------------------------------------------------------------------------- workers
def test_another_worker_reopens_inodes_by_handle(rig):
    n, fh = rig.create(ROOT_ID, b"shared")
    rig.c.write(n, fh, 0, b"from worker 0")
    fs1 = PassthroughFs(rig.options, rig.table, 1)
    s1 = FuseServer(fs1, rig.options, session=rig.server.session)
    c1 = FuseClient(s1)
    try:
        assert attr(c1.getattr(n))[1] == 13
        # Worker 0 owns fh: worker 1 serves READ/WRITE on it with a borrowed duplicate of
        # worker 0's fd, and every other fh op is EBADF there.
        assert c1.read(n, fh, 0, 100).body == b"from worker 0"
        assert c1.write(n, fh, 0, b"FROM").error == 0
        assert c1.call(Opcode.FSYNC, n, abi.FSYNC_IN.pack(fh, 0, 0)).error == errno.EBADF
        fh1 = open_fh(c1.open(n))[0]
        assert fh1 >> 48 == 2  # owner index 1 encoded
        assert c1.read(n, fh1, 0, 100).body == b"FROM worker 0"
        assert rig.c.read(n, fh1, 5, 100).body == b"worker 0"  # and the other way round
        assert entry(c1.lookup(ROOT_ID, b"shared"))[0] == n  # one nodeid across workers
        assert rig.table.get(n).nlookup == 2
        assert c1.release(n, fh1).error == 0
        assert rig.c.release(n, fh).error == 0
        assert c1.read(n, fh, 0, 100).error == errno.EBADF  # released: nothing to borrow
        assert rig.c.read(n, fh1, 0, 100).error == errno.EBADF
    finally:
        fs1.close()


def test_deleted_and_recreated_name_gets_a_new_nodeid(rig):
    """The guest still holds the old inode (same name, and on ext4 often the same st_ino
    for the new file): the file handle's generation tells them apart."""
    with open(rig.host("f"), "wb") as f:
        f.write(b"old")
    old = rig.lookup(ROOT_ID, b"f")
    os.unlink(rig.host("f"))
    with open(rig.host("f"), "wb") as f:
        f.write(b"new!")
    new = rig.lookup(ROOT_ID, b"f")
    assert new != old
    assert attr(rig.c.getattr(new))[1] == 4
    assert rig.table.get(old).nlookup == 1 and rig.table.get(new).nlookup == 1
    assert rig.lookup(ROOT_ID, b"f") == new


def test_worker_processes_racing_lookups_agree_on_nodeids(rig):
    """Two worker processes (each its own PassthroughFs on the shared table) look up the
    same names, two of them hard links of one file, and hammer lookup + forget on them
    while each keeps one reference: one nodeid per inode, exact counts at the end."""
    names = [b"a", b"b", b"c", b"link-to-a"]
    for n in names[:3]:
        with open(rig.host(n.decode()), "wb") as f:
            f.write(n)
    os.link(rig.host("a"), rig.host("link-to-a"))
    r, w = os.pipe()
    pids = []
    for index in (1, 2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fs = PassthroughFs(rig.options, rig.table, index)
                held = [fs.lookup(ROOT_ID, n).nodeid for n in names]
                for i in range(400):
                    n = fs.lookup(ROOT_ID, names[i % 4]).nodeid
                    assert n == held[i % 4]
                    rig.table.forget(n, 1)  # the supervisor's FORGET
                os.write(w, b"".join(n.to_bytes(8, "little") for n in held))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    got = [os.read(r, 32) for _ in pids]
    os.close(r)
    os.close(w)
    assert got[0] == got[1]
    held = [int.from_bytes(got[0][i:i + 8], "little") for i in range(0, 32, 8)]
    assert held[0] == held[3] and len(set(held)) == 3  # hard links: one nodeid
    assert [rig.table.get(n).nlookup for n in held] == [4, 2, 2, 4]
    for n in held[:3]:
        rig.table.forget(n, 4)
    assert rig.table.count() == 1
    assert rig.lookup(ROOT_ID, b"a") not in held  # freed, so a fresh nodeid


def test_deleted_inode_reopen_is_estale(rig):
    n, fh = rig.create(ROOT_ID, b"gone")
    rig.c.release(n, fh)
    fs1 = PassthroughFs(rig.options, rig.table, 1)
    try:
        os.unlink(rig.host("gone"))
        rig.fs.destroy()  # drop worker 0's cached fd too
        with pytest.raises(OSError) as ei:
            fs1.getattr(n, None)
        assert ei.value.errno == errno.ESTALE
    finally:
        fs1.close()


def test_destroy_and_reinit(rig):
    n, fh = rig.create(ROOT_ID, b"f")
    assert rig.c.call(Opcode.DESTROY).error == 0
    assert rig.server.session is None and rig.table.count() == 1
    assert rig.c.getattr(ROOT_ID).error == errno.EIO
    assert rig.c.init().error == 0
    assert rig.c.read(n, fh, 0, 1).error == errno.EBADF
    assert rig.c.getattr(n).error == errno.ESTALE
    n2 = rig.lookup(ROOT_ID, b"f")
    assert n2 != n
    # A second INIT without DESTROY also starts afresh.
    _, fh2 = rig.create(ROOT_ID, b"g")
    assert rig.c.init().error == 0
    assert rig.c.read(n2, fh2, 0, 1).error == errno.EBADF and rig.table.count() == 1


def test_fd_cache_is_bounded(tmp_path):
    before = open_fds()
    r = make_rig(tmp_path)
    try:
        r.fs.inodes.capacity = 16
        for i in range(60):
            open(r.host(f"f{i}"), "w").close()
            r.lookup(ROOT_ID, b"f%d" % i)
        assert len(r.fs.inodes) == 16
        assert len(open_fds() - before) < 40
        # evicted entries reopen transparently from their handles
        first = r.lookup(ROOT_ID, b"f0")
        assert attr(r.c.getattr(first))[0] == os.stat(r.host("f0")).st_ino
    finally:
        r.close()


# ----------------------------------------------------------------------------- robustness
def test_hostile_numbers(rig):
    n, fh = rig.create(ROOT_ID, b"f")
    assert rig.c.read(n, fh, 1 << 63, 10).error == errno.EINVAL
    assert rig.c.write(n, fh, (1 << 64) - 1, b"x").error == errno.EINVAL
    # READ larger than the buffer the guest provided
    r = rig.c.call(Opcode.READ, n, abi.READ_IN.pack(fh, 0, 0xFFFFFFFF, 0, 0, 0, 0), out=100)
    assert r.error == errno.EIO
    # BATCH_FORGET claiming more entries than it carries
    body = abi.BATCH_FORGET_IN.pack(1 << 31, 0) + abi.FORGET_ONE.pack(n, 1)
    assert rig.c.call(Opcode.BATCH_FORGET, 0, body, writable=[]).written == 0
    assert not rig.table.is_live(n)
    dfh = open_fh(rig.c.opendir(ROOT_ID))[0]
    for off in (12345, 1 << 63, (1 << 64) - 1):
        r = rig.c.readdir(ROOT_ID, dfh, off)
        assert r.error in (0, errno.EINVAL, errno.ENOENT)


class Broken(PassthroughFs):
    def getattr(self, nodeid, fh):
        raise RuntimeError("bug")


def test_local_bugs_become_eio_and_base_class_is_enosys(tmp_path, caplog):
    table = InodeTable.create(16)
    os.mkdir(tmp_path / "e")
    opts = FsOptions(shared_dir=str(tmp_path / "e"))
    umask = os.umask(0o022)
    os.umask(umask)
    fs = Broken(opts, table)
    c = FuseClient(FuseServer(fs))
    c.init()
    assert c.getattr(ROOT_ID).error == errno.EIO
    assert "opcode 3 failed" in caplog.text
    fs.close()
    assert os.umask(umask) == umask  # the process umask is restored on close
    table.close()

    from workers.passthrough.filesystem import FileSystem

    bare = FuseClient(FuseServer(FileSystem(), opts))
    assert bare.init().error == 0
    assert bare.lookup(ROOT_ID, b"x").error == errno.ENOSYS
    assert bare.getattr(ROOT_ID).error == errno.ENOSYS
    assert bare.call(Opcode.STATFS, ROOT_ID).error == errno.ENOSYS


def test_group_writable_dir_needs_the_callers_group(rig):
    os.mkdir(rig.host("g"), 0o775)
    os.chown(rig.host("g"), 0, 0)  # group root: a caller outside it must not get in
    g = rig.lookup(ROOT_ID, b"g")
    assert rig.c.mkdir(g, b"x", uid=1000, gid=1000).error == errno.EACCES
    assert rig.c.mkdir(g, b"x", uid=1000, gid=0).error == 0


def test_fhs_of_a_previous_incarnation_are_ebadf(rig):
    from workers.passthrough.handles import Handle, HandleTable

    n, fh = rig.create(ROOT_ID, b"f")
    fs2 = PassthroughFs(rig.options, rig.table, 0, 1)  # worker 0 respawned
    c2 = FuseClient(FuseServer(fs2, session=rig.server.session))
    try:
        fh2 = open_fh(c2.open(n))[0]
        assert fh2 != fh and c2.read(n, fh, 0, 1).error == errno.EBADF
    finally:
        fs2.close()
    # local = sequence (24 bits) | lending slot (12 bits); the sequence wraps, never to 0,
    # and skips values still open.
    t = HandleTable(0)
    a = t.add(Handle(-1, 0, 0, False))
    assert (a >> 12 & 0xFFFFFF, a & 0xFFF) == (1, 0)
    t._seq = (1 << 24) - 1
    b = t.add(Handle(-1, 0, 0, False))
    assert (b >> 12 & 0xFFFFFF, b & 0xFFF) == (1, 1)
    t.pop(a)
    t._seq = (1 << 24) - 1
    t._free_slots.append(1)  # force slot 1 again: (1, 1) is still open
    c = t.add(Handle(-1, 0, 0, False))
    assert (c >> 12 & 0xFFFFFF, c & 0xFFF) == (2, 1)


def test_submount_inodes_reopen_in_another_worker(rig):
    import subprocess

    mnt = rig.host("mnt")
    os.mkdir(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], capture_output=True).returncode:
        pytest.skip("cannot mount tmpfs here")
    fs1 = PassthroughFs(rig.options, rig.table, 1)
    try:
        with open(os.path.join(mnt, "inner"), "wb") as f:
            f.write(b"on tmpfs")
        m = rig.lookup(ROOT_ID, b"mnt")
        inner = rig.lookup(m, b"inner")
        assert rig.table.get(inner).mnt_id != rig.table.get(ROOT_ID).mnt_id
        st = fs1.getattr(inner, None)  # worker 1: open_by_handle_at via the submount's fd
        assert st.st_size == 8 and st.st_ino == os.stat(os.path.join(mnt, "inner")).st_ino
        assert rig.lookup(m, b"..") == ROOT_ID
    finally:
        fs1.close()
        rig.fs.destroy()
        subprocess.run(["umount", "-l", mnt], check=False)


def test_other_root_in_the_same_table_is_refused(rig, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ExportError):
        PassthroughFs(FsOptions(shared_dir=str(other)), rig.table, 1)
