"""Each file-system option changes what the server does: every test here fails if the option
were ignored (FuseServer + PassthroughFs over a temporary export, as root)."""

import errno
import fcntl
import os
import stat
import struct
import subprocess

import pytest
from fusereq import INIT_FLAGS_61, FuseClient, attr, entry, open_fh, parse_dirents
from test_passthrough import Rig

from vfsd.fs.inode_table import ROOT_ID, InodeTable
from vfsd.fuse import abi
from vfsd.fuse.abi import InitFlags, Opcode
from vfsd.fuse.options import FsOptions
from workers.passthrough.fs import PassthroughFs
from workers.server import FuseServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (file handles, creds)")

ATTR_FLAGS = 15  # index of fuse_attr.flags in the attr tuple of fusereq.entry()


@pytest.fixture
def make(tmp_path):
    rigs = []

    def factory(**opts):
        r = Rig(tmp_path / f"r{len(rigs)}", **opts)
        rigs.append(r)
        return r

    (tmp_path).mkdir(exist_ok=True)
    for i in range(8):
        (tmp_path / f"r{i}").mkdir()
    yield factory
    for r in rigs:
        r.close()


def fopen_flags(r, nodeid, flags=os.O_RDONLY):
    return open_fh(r.c.open(nodeid, flags))


def handle_fd_flags(r, fh):
    return fcntl.fcntl(r.fs.handles.get(fh).fd, fcntl.F_GETFL)


# ------------------------------------------------------------------------------ cache
@pytest.mark.parametrize(
    ("cache", "timeout", "file_fopen", "dir_fopen"),
    [
        ("never", 0, abi.FOPEN_DIRECT_IO, 0),
        ("auto", 1, 0, 0),
        ("metadata", 86400, abi.FOPEN_DIRECT_IO, abi.FOPEN_CACHE_DIR),
        ("always", 86400, abi.FOPEN_KEEP_CACHE, abi.FOPEN_CACHE_DIR),
    ],
)
def test_cache_modes(make, cache, timeout, file_fopen, dir_fopen):
    r = make(cache=cache)
    n, _ = r.create(ROOT_ID, b"f")
    e = abi.ENTRY_OUT.unpack(r.c.lookup(ROOT_ID, b"f").body)
    assert e[2] == e[3] == timeout  # entry_valid, attr_valid
    assert abi.ATTR_OUT.unpack(r.c.getattr(n).body)[0] == timeout
    assert fopen_flags(r, n)[1] == file_fopen
    assert open_fh(r.c.opendir(ROOT_ID))[1] == dir_fopen
    neg = r.c.lookup(ROOT_ID, b"missing")
    assert neg.error == (errno.ENOENT if cache == "never" else 0)
    assert r.server.session.has(InitFlags.CACHE_SYMLINKS) == (cache != "never")


# ------------------------------------------------------------------------------ open flags
def test_allow_direct_io(make):
    for allow in (False, True):
        r = make(allow_direct_io=allow)
        n, _ = r.create(ROOT_ID, b"f")
        fh, _ = fopen_flags(r, n, os.O_RDWR | os.O_DIRECT)
        assert bool(handle_fd_flags(r, fh) & os.O_DIRECT) == allow


def test_preserve_noatime(make):
    for keep in (False, True):
        r = make(preserve_noatime=keep)
        n, _ = r.create(ROOT_ID, b"f")
        fh, _ = fopen_flags(r, n, os.O_RDONLY | os.O_NOATIME)
        assert bool(handle_fd_flags(r, fh) & os.O_NOATIME) == keep


# ------------------------------------------------------------------------------ killpriv_v2
def test_killpriv_v2(make):
    for on in (False, True):
        r = make(killpriv_v2=on)
        assert r.server.session.has(InitFlags.HANDLE_KILLPRIV_V2) == on
        n, fh = r.create(ROOT_ID, b"f", mode=0o6755)
        os.chmod(r.host("f"), 0o6755)
        # WRITE's flag is honoured whatever the session: the guest sets it for direct I/O
        # writes too, where it cannot clear the bits itself.
        body = abi.WRITE_IN.pack(fh, 0, 1, abi.FUSE_WRITE_KILL_SUIDGID, 0, 0, 0) + b"x"
        assert r.c.call(Opcode.WRITE, n, body).error == 0
        assert stat.S_IMODE(os.stat(r.host("f")).st_mode) == 0o755
        body = abi.WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"x"
        os.chmod(r.host("f"), 0o6755)
        assert r.c.call(Opcode.WRITE, n, body).error == 0  # a privileged writer: kept
        assert stat.S_IMODE(os.stat(r.host("f")).st_mode) == 0o6755
        # sgid without group-execute stays (it marks mandatory locking, not privilege)
        os.chmod(r.host("f"), 0o6744)
        a = attr(r.c.setattr(n, abi.FATTR_SIZE | abi.FATTR_KILL_SUIDGID, size=0))
        assert stat.S_IMODE(a[9]) == (0o2744 if on else 0o6744)
        os.chmod(r.host("f"), 0o4755)
        r.c.call(Opcode.OPEN, n, abi.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC,
                                                   abi.FUSE_OPEN_KILL_SUIDGID))
        assert stat.S_IMODE(os.stat(r.host("f")).st_mode) == (0o755 if on else 0o4755)


# ------------------------------------------------------------------------------ submounts
def test_announce_submounts(make):
    results = []
    for on in (False, True):
        r = make(announce_submounts=on)
        mnt = r.host("mnt")
        os.mkdir(mnt)
        os.mkdir(r.host("plain"))
        if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], capture_output=True).returncode:
            pytest.skip("cannot mount tmpfs here")
        try:
            assert r.server.session.has(InitFlags.SUBMOUNTS) == on
            _, a = entry(r.c.lookup(ROOT_ID, b"mnt"))
            _, p = entry(r.c.lookup(ROOT_ID, b"plain"))
            fh = open_fh(r.c.opendir(ROOT_ID))[0]
            plus = {e.name: e.attr for e in r.readdir_all(ROOT_ID, fh, plus=True)}
            results.append((a[ATTR_FLAGS], p[ATTR_FLAGS], plus[b"mnt"][ATTR_FLAGS]))
        finally:
            r.fs.destroy()
            subprocess.run(["umount", "-l", mnt], check=False)
    flag = abi.FUSE_ATTR_SUBMOUNT
    assert results == [(0, 0, 0), (flag, 0, flag)]


# ------------------------------------------------------------------------------ posix_acl
def acl(*entries):
    """A system.posix_acl_* value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


USER_OBJ, GROUP_OBJ, MASK, OTHER = 0x01, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def test_posix_acl_default_acl_replaces_umask(make):
    modes = []
    for on in (False, True):
        r = make(posix_acl=on)
        assert r.server.session.has(InitFlags.POSIX_ACL) == on
        os.mkdir(r.host("d"))
        os.setxattr(r.host("d"), "system.posix_acl_default",
                    acl((USER_OBJ, 7, NO_ID), (GROUP_OBJ, 7, NO_ID), (OTHER, 7, NO_ID)))
        d = r.lookup(ROOT_ID, b"d")
        r.create(d, b"f", mode=0o666, umask=0o022)
        r.mkdir(d, b"sub", mode=0o777, umask=0o077)
        r.create(ROOT_ID, b"g", mode=0o666, umask=0o022)  # no default ACL: umask applies
        modes.append(tuple(stat.S_IMODE(os.stat(r.host(*p)).st_mode)
                           for p in (("d", "f"), ("d", "sub"), ("g",))))
        if on:  # the sub-directory inherited the default ACL
            assert os.getxattr(r.host("d", "sub"), "system.posix_acl_default")
    assert modes == [(0o644, 0o700, 0o644), (0o666, 0o777, 0o644)]


def test_posix_acl_serves_acl_xattrs_and_kills_sgid(make):
    r = make(posix_acl=True)  # xattr is not set: posix_acl implies it
    n, _ = r.create(ROOT_ID, b"f", mode=0o2775)
    os.chmod(r.host("f"), 0o2775)
    value = acl((USER_OBJ, 7, NO_ID), (0x02, 6, 1234), (GROUP_OBJ, 5, NO_ID), (MASK, 7, NO_ID),
                (OTHER, 0, NO_ID))  # ACL_USER 1234: rw-
    name = b"system.posix_acl_access"
    body = abi.SETXATTR_IN_EXT.pack(len(value), 0, abi.FUSE_SETXATTR_ACL_KILL_SGID, 0)
    assert r.c.call(Opcode.SETXATTR, n, body + name + b"\0" + value).error == 0
    st = os.stat(r.host("f"))
    assert not st.st_mode & stat.S_ISGID
    assert os.getxattr(r.host("f"), name) == value
    got = r.c.call(Opcode.GETXATTR, n, abi.GETXATTR_IN.pack(256, 0) + name + b"\0")
    assert got.body == value


# ------------------------------------------------------------------------------ security_label
def secctx(name=b"security.selinux", value=b"system_u:object_r:vfsd_t:s0\0"):
    rec = abi.SECCTX.pack(len(value), 0) + name + b"\0" + value
    total = (8 + len(rec) + 7) & ~7
    return (abi.SECCTX_HEADER.pack(total, 1) + rec).ljust(total, b"\0")


def test_security_label_on_creates(make):
    for on in (False, True):
        r = make(security_label=on)
        assert r.server.session.has(InitFlags.SECURITY_CTX) == on
        ctx = secctx()
        r.c.call(Opcode.CREATE, ROOT_ID,
                 abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"f\0", ext=ctx)
        r.c.call(Opcode.MKDIR, ROOT_ID, abi.MKDIR_IN.pack(0o755, 0) + b"d\0", ext=ctx)
        r.c.call(Opcode.SYMLINK, ROOT_ID, b"l\0target\0", ext=ctx)
        r.c.call(Opcode.MKNOD, ROOT_ID, abi.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0, 0)
                 + b"p\0", ext=ctx)
        for name in ("f", "d", "l", "p"):
            path = r.host(name)
            try:
                label = os.getxattr(path, "security.selinux", follow_symlinks=False)
            except OSError:
                label = None
            assert label == (b"system_u:object_r:vfsd_t:s0\0" if on else None), name


def test_security_label_minor_37_block_after_the_name(tmp_path):
    os.mkdir(tmp_path / "e")
    table = InodeTable.create(64)
    opts = FsOptions(shared_dir=str(tmp_path / "e"), security_label=True)
    fs = PassthroughFs(opts, table)
    server = FuseServer(fs, opts)
    c = FuseClient(server)
    try:
        assert c.init(minor=37).error == 0 and server.session.has(InitFlags.SECURITY_CTX)
        body = abi.MKDIR_IN.pack(0o755, 0) + b"d\0" + secctx(value=b"lbl")
        assert c.call(Opcode.MKDIR, ROOT_ID, body).error == 0
        assert os.getxattr(tmp_path / "e" / "d", "security.selinux") == b"lbl"
        # No LSM in the guest: the empty header {8, 0}.
        body = abi.MKDIR_IN.pack(0o755, 0) + b"d2\0" + abi.SECCTX_HEADER.pack(8, 0)
        assert c.call(Opcode.MKDIR, ROOT_ID, body).error == 0
        # A context that does not fit its block is refused, nothing is created.
        bad = abi.SECCTX_HEADER.pack(32, 1) + abi.SECCTX.pack(200, 0) + b"security.x\0ab"
        body = abi.MKDIR_IN.pack(0o755, 0) + b"d3\0" + bad
        assert c.call(Opcode.MKDIR, ROOT_ID, body).error == errno.EINVAL
        assert sorted(os.listdir(tmp_path / "e")) == ["d", "d2"]
    finally:
        server.close()
        fs.close()
        table.close()


# ------------------------------------------------------------------------------ xattrmap
def test_xattrmap(make):
    r = make(xattr=True, xattrmap=":prefix:all::user.virtiofs.::bad:all:::")
    n, _ = r.create(ROOT_ID, b"f")
    os.setxattr(r.host("f"), "user.host_only", b"h")
    body = abi.SETXATTR_IN_EXT.pack(1, 0, 0, 0) + b"trusted.overlay.opaque\0y"
    assert r.c.call(Opcode.SETXATTR, n, body).error == 0
    assert os.getxattr(r.host("f"), "user.virtiofs.trusted.overlay.opaque") == b"y"
    lst = r.c.call(Opcode.LISTXATTR, n, abi.GETXATTR_IN.pack(1024, 0)).body
    assert lst.split(b"\0")[:-1] == [b"trusted.overlay.opaque"]
    got = r.c.call(Opcode.GETXATTR, n, abi.GETXATTR_IN.pack(64, 0) + b"trusted.overlay.opaque\0")
    assert got.body == b"y"
    assert r.c.call(Opcode.REMOVEXATTR, n, b"trusted.overlay.opaque\0").error == 0
    assert os.listxattr(r.host("f")) == ["user.host_only"]
    r2 = make(xattr=True, xattrmap=":bad:client:user.secret.::  :ok:all:::")
    n2, _ = r2.create(ROOT_ID, b"f")
    body = abi.SETXATTR_IN_EXT.pack(1, 0, 0, 0) + b"user.secret.k\0y"
    assert r2.c.call(Opcode.SETXATTR, n2, body).error == errno.EPERM
    got = r2.c.call(Opcode.GETXATTR, n2, abi.GETXATTR_IN.pack(64, 0) + b"user.secret.k\0")
    assert got.error == errno.ENODATA


def test_xattr_off_is_enosys(make):
    r = make()
    n, _ = r.create(ROOT_ID, b"f")
    assert r.c.call(Opcode.LISTXATTR, n, abi.GETXATTR_IN.pack(0, 0)).error == errno.ENOSYS
    assert not r.server.session.has(InitFlags.SETXATTR_EXT)


# ------------------------------------------------------------------------------ readonly
def test_readonly_refuses_new_writing_ops(make):
    r = make(readonly=True, xattr=True)
    with open(r.host("f"), "w") as f:
        f.write("x")
    n = r.lookup(ROOT_ID, b"f")
    tmp = abi.CREATE_IN.pack(os.O_RDWR, 0o600, 0, 0) + b"/\0"
    assert r.c.call(Opcode.TMPFILE, ROOT_ID, tmp).error == errno.EROFS
    body = abi.SETXATTR_IN_EXT.pack(1, 0, 0, 0) + b"user.a\0y"
    assert r.c.call(Opcode.SETXATTR, n, body).error == errno.EROFS
    assert r.c.call(Opcode.REMOVEXATTR, n, b"user.a\0").error == errno.EROFS
    fh = open_fh(r.c.open(n))[0]
    assert r.c.call(Opcode.FALLOCATE, n, abi.FALLOCATE_IN.pack(fh, 0, 10, 0, 0)).error == \
        errno.EROFS


# ------------------------------------------------------------------------------ tmpfile
def test_tmpfile_then_link_into_place(make):
    r = make()
    d = r.mkdir(ROOT_ID, b"d", mode=0o777)
    reply = r.c.call(Opcode.TMPFILE, d, abi.CREATE_IN.pack(os.O_RDWR, 0o640, 0o022, 0) + b"/\0",
                     uid=1234, gid=5678)
    n, a = entry(reply)
    fh = open_fh(reply, 128)[0]
    assert a[10] == 0 and (a[11], a[12]) == (1234, 5678)  # nlink 0, caller's ids
    assert os.listdir(r.host("d")) == []
    assert r.c.write(n, fh, 0, b"tmp data").error == 0
    assert entry(r.c.link(n, d, b"named"))[0] == n
    with open(r.host("d", "named"), "rb") as f:
        assert f.read() == b"tmp data"
    assert stat.S_IMODE(os.stat(r.host("d", "named")).st_mode) == 0o640


# ------------------------------------------------------------------------------ ids
def test_translate_uid_gid(make):
    r = make(translate_uid=("map:1000:5000:10", "forbid-guest:2000:1"),
             translate_gid=("squash-guest:0:77:1", "host:7000:300:1"))
    reply = r.c.create(ROOT_ID, b"f", uid=1003, gid=0)
    n, a = entry(reply)
    st = os.stat(r.host("f"))
    assert (st.st_uid, st.st_gid) == (5003, 77)
    assert (a[11], a[12]) == (1003, 77)  # guest view: 5003 -> 1003, gid 77 unmapped back
    os.chown(r.host("f"), 5001, 7000)
    assert attr(r.c.getattr(n))[11:13] == (1001, 300)
    assert r.c.create(ROOT_ID, b"g", uid=2000, gid=0).error == errno.EPERM
    assert r.c.mkdir(ROOT_ID, b"h", uid=2000, gid=0).error == errno.EPERM
    a = attr(r.c.setattr(n, abi.FATTR_UID | abi.FATTR_GID, uid=1009, gid=0))
    assert (os.stat(r.host("f")).st_uid, os.stat(r.host("f")).st_gid) == (5009, 77)
    assert a[11] == 1009
    assert r.c.setattr(n, abi.FATTR_UID, uid=2000).error == errno.EPERM
    fh = open_fh(r.c.opendir(ROOT_ID))[0]
    ents = {e.name: e for e in parse_dirents(r.c.readdir(ROOT_ID, fh, 0, 4096, True).body, True)}
    assert ents[b"f"].attr[11] == 1009
    # ACCESS checks the caller's host ids: guest 1009 is the owner (host 5009).
    os.chmod(r.host("f"), 0o600)
    acc = r.c.call(Opcode.ACCESS, n, abi.ACCESS_IN.pack(os.W_OK, 0), uid=1009, gid=0)
    assert acc.error == 0
    acc = r.c.call(Opcode.ACCESS, n, abi.ACCESS_IN.pack(os.W_OK, 0), uid=4242, gid=0)
    assert acc.error == errno.EACCES


# ------------------------------------------------------------------------------ handles
def test_inode_file_handles_never_pins_inodes_in_one_worker(tmp_path):
    os.mkdir(tmp_path / "e")
    table = InodeTable.create(64)
    opts = FsOptions(shared_dir=str(tmp_path / "e"), inode_file_handles="never")
    fs = PassthroughFs(opts, table)
    server = FuseServer(fs, opts)
    c = FuseClient(server)
    fs1 = PassthroughFs(opts, table, 1)
    try:
        assert fs.pinned and c.init().error == 0
        fs.inodes.capacity = 16
        ids = []
        for i in range(40):
            (tmp_path / "e" / f"f{i}").write_text(str(i))
            ids.append(entry(c.lookup(ROOT_ID, b"f%d" % i))[0])
        assert all(not table.get(n).handle.data for n in ids)  # no handles taken
        assert len(fs.inodes) == 40  # pinned: no eviction
        assert all(attr(c.getattr(n))[1] == len(str(i)) for i, n in enumerate(ids))
        with pytest.raises(OSError) as e:  # another worker cannot reach them
            fs1.getattr(ids[0], None)
        assert e.value.errno == errno.ESTALE
        assert c.call(Opcode.FORGET, ids[0], abi.FORGET_IN.pack(1), writable=[]).written == 0
        assert len(fs.inodes) == 39 and fs.sweep() == 0  # the pinned fd closed with the FORGET
    finally:
        fs1.close()
        server.close()
        fs.close()
        table.close()


def test_inode_file_handles_prefer_uses_handles(make):
    r = make(inode_file_handles="prefer")
    n, _ = r.create(ROOT_ID, b"f")
    assert not r.fs.pinned and r.table.get(n).handle.data


# ------------------------------------------------------------------------------ misc
def test_writeback_offered_only_with_option(make):
    for on in (False, True):
        r = make(writeback=on)
        r.c.init(flags=INIT_FLAGS_61 | int(InitFlags.WRITEBACK_CACHE))
        assert r.server.session.has(InitFlags.WRITEBACK_CACHE) == on


def test_readdirplus_offered_only_with_option(make):
    for on in (False, True):
        r = make(readdirplus=on)
        assert r.server.session.has(InitFlags.DO_READDIRPLUS) == on


@pytest.mark.parametrize(("mode", "devices", "whiteouts"), [
    ("all", True, True), ("whiteouts", False, True), ("none", False, False)])
def test_allow_devices(make, mode, devices, whiteouts):
    r = make(allow_devices=mode)
    null = (1 << 8) | 3  # new_encode_dev(1, 3) = /dev/null
    for name, fmt, rdev, allowed in ((b"null", stat.S_IFCHR, null, devices),
                                     (b"sda", stat.S_IFBLK, 8 << 8, devices),
                                     (b"wh", stat.S_IFCHR, 0, whiteouts),  # overlayfs' whiteout
                                     (b"blk0", stat.S_IFBLK, 0, devices)):
        err = r.c.mknod(ROOT_ID, name, fmt | 0o600, rdev).error
        assert err == (0 if allowed else errno.EPERM), name
        assert os.path.lexists(r.host(name.decode())) == allowed, name
    (r.root / "x").write_bytes(b"x")
    err = r.c.rename(ROOT_ID, b"x", ROOT_ID, b"y", abi.RENAME_WHITEOUT).error
    assert err == (0 if whiteouts else errno.EPERM)
    assert stat.S_ISCHR(os.lstat(r.host("x")).st_mode) == whiteouts
    assert r.c.mknod(ROOT_ID, b"fifo", stat.S_IFIFO | 0o600).error == 0  # never a device


def test_inode_file_handles_on_a_file_system_without_handles(tmp_path, monkeypatch):
    import workers.passthrough.fs as fsmod
    from workers.passthrough.file_handle import NoHandleSupport

    def no_handles(fd):
        raise NoHandleSupport(errno.EOPNOTSUPP, "no export ops")

    monkeypatch.setattr(fsmod, "handle_of_fd", no_handles)
    os.mkdir(tmp_path / "e")
    with pytest.raises(fsmod.ExportError, match="no file-handle support"):
        fsmod.check_export(str(tmp_path / "e"))  # mandatory (the default)
    fsmod.check_export(str(tmp_path / "e"), "prefer")
    table = InodeTable.create(64)
    opts = FsOptions(shared_dir=str(tmp_path / "e"), inode_file_handles="prefer")
    fs = PassthroughFs(opts, table)
    server = FuseServer(fs, opts)
    try:
        c = FuseClient(server)
        assert fs.pinned and c.init().error == 0
        (tmp_path / "e" / "f").write_text("x")
        n = entry(c.lookup(ROOT_ID, b"f"))[0]
        assert attr(c.getattr(n))[1] == 1 and not table.get(n).handle.data
    finally:
        server.close()
        fs.close()
        table.close()
