"""PassthroughFs: FUSE operations on a host directory, shared by N worker processes.

Safety rules (ARCHITECTURE.md "Guest input is hostile"):
- Every guest name is one validated component resolved relative to its parent's O_PATH fd
  (`dir_fd=`), with O_NOFOLLOW / AT_SYMLINK_NOFOLLOW / AT_EMPTY_PATH: the daemon never
  follows a symlink, so it never leaves the export through one.
- O_PATH fds are reopened for I/O (via /proc/self/fd) only for regular files; directories
  are reopened with openat(fd, "."). Other file types are never opened.
- Inodes are identified across workers by the shared table (key + file handle); each worker
  reopens them from the handle.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import stat
import struct
from collections.abc import Iterator

from vfsd.fs.inode_table import ROOT_ID, FileHandle, InodeTable
from vfsd.fuse import abi
from vfsd.fuse.abi import InitFlags
from vfsd.fuse.idmap import IdMap
from vfsd.fuse.init import Session
from vfsd.fuse.options import FsOptions
from vfsd.fuse.xattrmap import XattrMap
from workers.passthrough import syscalls
from workers.passthrough.creds import GuestCreds
from workers.passthrough.file_handle import (
    MountFds,
    NoHandleSupport,
    handle_of_fd,
    open_by_handle,
)
from workers.passthrough.filesystem import (
    Context,
    DirEntry,
    Entry,
    FileSystem,
    Opened,
    SecCtx,
    SetAttr,
)
from workers.passthrough.handles import LENDING, Handle, HandleTable
from workers.passthrough.inodes import InodeCache
from workers.passthrough.locks import Lock, LockTable, Waiter
from workers.passthrough.names import check_lookup_name, check_name

log = logging.getLogger("vfsd.worker.passthrough")

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: Guest open flags we pass on. Dropped: O_CREAT/O_EXCL (CREATE handles them), O_NOCTTY,
#: O_LARGEFILE (guest 0x8000; implied on the host), O_DIRECTORY/O_NOFOLLOW/O_PATH/O_TMPFILE
#: (we reopen a known inode), FASYNC; O_DIRECT unless allow_direct_io (guest buffers need
#: not be aligned), O_NOATIME unless preserve_noatime (as virtiofsd).
_OPEN_KEEP = (
    os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_TRUNC
)
_NO_HANDLE = FileHandle(0, b"")
#: Entry(nodeid, st, flags) on the hot paths without NamedTuple's Python-level __new__.
_new_tuple = tuple.__new__
_WRITE_KILL_SUIDGID = abi.FUSE_WRITE_KILL_SUIDGID
_SUID_SGID = stat.S_ISUID | stat.S_ISGID
#: Names of the POSIX ACL xattrs (ACL_KILL_SGID applies to the access ACL).
_ACL_ACCESS = b"system.posix_acl_access"
#: d_ino d_off d_reclen d_type, then the name. d_off is read unsigned: the cookie is passed
#: through as 64 opaque bits and turned back into a signed loff_t for lseek.
_DIRENT64 = struct.Struct("<QQHB")
_OFF_MAX = (1 << 63) - 1
_PATH_MAX = 4096
_XATTR_NAME_MAX = 255
_XATTR_SIZE_MAX = 65536
_XATTR_FLAGS = os.XATTR_CREATE | os.XATTR_REPLACE  # what setxattr(2) takes
_FMT_TYPES = {stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK}


class ExportError(OSError):
    """The export cannot be served by this design (reported once, at start-up)."""


def _erofs() -> OSError:
    return OSError(errno.EROFS, "read-only export")


def _permits(st: os.stat_result, uid: int, gid: int, mask: int) -> bool:
    """Classic owner/group/other check for the caller (no ACLs, no supplementary groups:
    the guest's are unknown)."""
    mask &= 7
    if not mask:
        return True
    mode = st.st_mode
    if uid == 0:
        return not mask & os.X_OK or bool(mode & 0o111) or stat.S_ISDIR(mode)
    if st.st_uid == uid:
        bits = mode >> 6
    elif st.st_gid == gid:
        bits = mode >> 3
    else:
        bits = mode
    return not mask & ~bits & 7


def _decode_dev(rdev: int) -> int:
    """FUSE carries the kernel's new_encode_dev() u32; rebuild a host dev_t."""
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_export(shared_dir: str, inode_file_handles: str = "mandatory"
                ) -> tuple[int, os.stat_result, FileHandle | None, int, int]:
    """Open the export and prove that inodes can be shared between workers by file handle.

    Returns (root O_PATH fd, its stat, its handle or None, its mnt_id, a mount fd for
    open_by_handle_at). The handle is None when `inode_file_handles` is "never", or "prefer"
    and the file system has none (vfsd then runs one worker on O_PATH fds). Raises
    ExportError with a one-line reason.
    """
    try:
        root_fd = os.open(shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ExportError(f"cannot open shared dir {shared_dir!r}: {e.strerror}") from e
    try:
        st = os.fstat(root_fd)
        mount_fd = os.open(".", _O_DIR, dir_fd=root_fd)
        if inode_file_handles == "never":
            return root_fd, st, None, 0, mount_fd
        try:
            handle, mnt_id = handle_of_fd(root_fd)
        except NoHandleSupport as e:
            if inode_file_handles == "prefer":
                return root_fd, st, None, 0, mount_fd
            os.close(mount_fd)
            raise ExportError(
                f"{shared_dir!r}: its file system has no file-handle support "
                "(name_to_handle_at: EOPNOTSUPP); multi-worker vfsd needs it to share "
                "inodes between workers (inode_file_handles: prefer runs one worker instead)"
            ) from e
        try:
            os.close(open_by_handle(mount_fd, handle, os.O_PATH))
        except PermissionError as e:
            os.close(mount_fd)
            raise ExportError(
                "open_by_handle_at refused (needs CAP_DAC_READ_SEARCH, i.e. run as root)"
            ) from e
    except BaseException:
        os.close(root_fd)
        raise
    return root_fd, st, handle, mnt_id, mount_fd


def check_export(shared_dir: str, inode_file_handles: str = "mandatory") -> None:
    """Start-up check in the supervisor: raises ExportError if workers could not serve it
    with that `inode_file_handles` mode (the supervisor should pass its setting)."""
    root_fd, _st, _handle, _mnt_id, mount_fd = open_export(shared_dir, inode_file_handles)
    os.close(mount_fd)
    os.close(root_fd)


class _Umask:
    """Process umask = the request's for one create (posix_acl: the host kernel applies it
    only when the parent has no default ACL). Workers are single-threaded."""

    __slots__ = ("_mask", "_old")

    def __init__(self, mask: int) -> None:
        self._mask = mask & 0o777
        self._old = 0

    def __enter__(self) -> None:
        self._old = os.umask(self._mask)

    def __exit__(self, *exc: object) -> None:
        os.umask(self._old)


class _NoUmask:
    __slots__ = ()

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


_NO_UMASK = _NoUmask()


class PassthroughFs(FileSystem):
    """FUSE ops over `options.shared_dir`; one instance per worker process."""

    def set_options(self, options: FsOptions) -> None:
        """(Re)read the options used per request; SIGHUP changes the cache mode live."""
        self.options = options
        self._file_fopen = options.file_open_flags
        self._dir_fopen = options.dir_open_flags

    def __init__(
        self,
        options: FsOptions,
        table: InodeTable,
        worker_index: int = 0,
        incarnation: int = 0,
        *,
        fd_cache_size: int = 4096,
    ) -> None:
        """`incarnation` (bumped by the supervisor on every respawn of this worker index)
        goes into the fhs, so a restarted worker never honours its predecessor's fhs."""
        self.options = options
        self.table = table
        self.readonly = options.readonly
        self.set_options(options)
        self._dont_mask = False
        self._writeback = False
        self._killpriv = False
        self._submounts = False
        self._acl_umask = False
        keep = _OPEN_KEEP
        if options.allow_direct_io:
            keep |= os.O_DIRECT
        if options.preserve_noatime:
            keep |= os.O_NOATIME
        self._open_keep = keep
        self._xmap = XattrMap(options.xattrmap) if options.xattrmap else None
        self._uids = IdMap(options.translate_uid)
        self._gids = IdMap(options.translate_gid)
        #: Guest <-> host id translation configured (else ids pass unchanged).
        self.idmapped = not (self._uids.identity and self._gids.identity)
        # Modes come from the guest (already masked, or masked by us with DONT_MASK).
        self._saved_umask = os.umask(0)
        # Creating ops run with the caller's euid/egid; root's supplementary groups must not
        # grant them extra access (the guest's own groups are unknown).
        self._saved_groups = os.getgroups()
        if os.geteuid() == 0 and self._saved_groups:
            os.setgroups([])
        nofile = _raise_nofile_limit()
        self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            root_fd, st, handle, mnt_id, self._root_mount_fd = open_export(
                options.shared_dir, options.inode_file_handles)
        except BaseException:
            os.close(self._proc_fd)
            raise
        #: No file handles (inode_file_handles never, or prefer on a file system without
        #: them): inodes are kept as pinned O_PATH fds and only this worker can serve them.
        self.pinned = handle is None
        self._root_mnt_id = mnt_id
        self._root_dev = st.st_dev
        self.mounts = MountFds(self._proc_fd)
        self.mounts.add(mnt_id, self._root_mount_fd)
        try:
            table.set_root((st.st_dev, st.st_ino, mnt_id), handle or _NO_HANDLE)
        except ValueError as e:
            self.mounts.close()
            os.close(root_fd)
            os.close(self._proc_fd)
            raise ExportError(f"{options.shared_dir!r} is not the export this table serves") from e
        # (An op holds at most a few cached fds at once, so LRU eviction during an op never
        # closes an fd it is still using: the cache keeps at least 16.)
        self.inodes = InodeCache(table, self.mounts, root_fd, min(fd_cache_size, nofile // 2))
        self.handles = HandleTable(worker_index, incarnation)
        self.locks = LockTable(self._inode_key, self._lock_ofd, self._fh_fd)
        self._dirbuf = ctypes.create_string_buffer(8192)
        self._warned_mounts: set[int] = set()

    def recover_handles(self) -> tuple[int, int]:
        """Reopen the files and directories a dead predecessor in this worker slot had open
        for the guest, so their fhs keep working (the same nodeid, the open flags without
        O_CREAT/O_EXCL/O_TRUNC; locks and flock on them are gone with the old process).
        Returns (recovered, lost)."""
        recovered = lost = 0
        for slot, fh, nodeid, flags, is_dir in self.handles.orphans():
            handle = None
            try:
                ipath = self.inodes.fd(nodeid)
                if is_dir:
                    handle = Handle(os.open(".", _O_DIR, dir_fd=ipath), nodeid, _O_DIR, True)
                else:
                    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
                    handle = Handle(self._reopen_regular(ipath, flags), nodeid, flags, False)
                recovered += 1
            except OSError as e:
                log.warning("cannot reopen fh %#x (nodeid %d) of the previous worker: %s",
                            fh, nodeid, e)
                lost += 1
            self.handles.adopt(slot, fh, handle)
        return recovered, lost

    def close(self) -> None:
        """Release every fd (tests; a worker process just exits)."""
        self.destroy()
        os.close(self.inodes.root_fd)
        self.mounts.close()
        os.close(self._proc_fd)
        os.umask(self._saved_umask)
        if os.geteuid() == 0 and self._saved_groups:
            os.setgroups(self._saved_groups)

    # ------------------------------------------------------------------ session
    def start_session(self, session: Session) -> None:
        self._dont_mask = session.has(InitFlags.DONT_MASK)
        self._writeback = session.has(InitFlags.WRITEBACK_CACHE)
        self._killpriv = session.has(InitFlags.HANDLE_KILLPRIV_V2)
        self._submounts = session.has(InitFlags.SUBMOUNTS)
        self._acl_umask = session.has(InitFlags.POSIX_ACL)

    def destroy(self) -> None:
        self.locks.close_all()
        self.handles.close_all()
        self.inodes.clear()

    def sweep(self) -> int:
        return self.inodes.sweep()

    def forget(self, nodeid: int, nlookup: int) -> None:
        if self.table.forget(nodeid, nlookup):
            self.inodes.drop([nodeid])

    def forgotten(self, nodeids: list[int]) -> int:
        """The supervisor freed these nodeids: close their cached fds now."""
        return self.inodes.drop(nodeids)

    # ------------------------------------------------------------------ helpers
    def _entry_of(self, fd: int, parent: int | None = None,
                  st: os.stat_result | None = None) -> Entry:
        """Register the inode `fd` (O_PATH, ownership taken) in the table: nlookup += 1.
        `parent` (the directory it was found in) lets a mount point be flagged as a
        submount; `st` is fd's stat when the caller has it already."""
        try:
            if st is None:
                st = os.fstat(fd)
            if self.pinned:
                handle, mnt_id = _NO_HANDLE, 0
            else:
                try:
                    handle, mnt_id = handle_of_fd(fd)
                except NoHandleSupport:
                    if st.st_dev not in self._warned_mounts:
                        self._warned_mounts.add(st.st_dev)
                        log.warning("submount dev %#x has no file handles: entries on it fail "
                                    "with EOPNOTSUPP (inode_file_handles: never serves them "
                                    "with one worker)", st.st_dev)
                    raise
            nodeid = self.table.ref((st.st_dev, st.st_ino, mnt_id), handle)
        except BaseException:
            os.close(fd)
            raise
        self.inodes.insert(nodeid, fd, self.pinned)
        flags = 0
        if (self._submounts and parent is not None and stat.S_ISDIR(st.st_mode)
                and self._is_mount_root(parent, st.st_dev, mnt_id)):
            flags = abi.FUSE_ATTR_SUBMOUNT
        return _new_tuple(Entry, (nodeid, st, flags))

    def _is_mount_root(self, parent: int, dev: int, mnt_id: int) -> bool:
        if parent == ROOT_ID:
            pdev, pmnt = self._root_dev, self._root_mnt_id
        else:
            e = self.table.get(parent)
            if e is None:
                return False
            pdev, pmnt = e.dev, e.mnt_id
        return dev != pdev or mnt_id != pmnt

    def _lookup_at(self, parent_fd: int, name: bytes, parent: int | None = None) -> Entry:
        return self._entry_of(os.open(name, _O_PATH, dir_fd=parent_fd), parent)

    def _ref_self(self, nodeid: int, fd: int) -> Entry:
        entry = self.table.get(nodeid)
        if entry is None:
            raise OSError(errno.ESTALE, "stale nodeid")
        # Any file type: with EXPORT_SUPPORT the kernel revalidates NFS file handles by
        # looking up "." in the nodeid itself (fuse_get_dentry).
        return Entry(self.table.ref(entry.key, entry.handle), os.fstat(fd))

    def _creds(self, ctx: Context) -> GuestCreds:
        """The caller's host ids for a creating op (translated; EPERM if forbidden)."""
        if self.idmapped:
            return GuestCreds(self._uids.to_host(ctx.uid), self._gids.to_host(ctx.gid))
        return GuestCreds(ctx.uid, ctx.gid)

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        return self._uids.to_host(uid), self._gids.to_host(gid)

    def guest_uid(self, uid: int) -> int:
        return self._uids.to_guest(uid)

    def guest_gid(self, gid: int) -> int:
        return self._gids.to_guest(gid)

    def _umask(self, umask: int) -> _Umask | _NoUmask:
        return _Umask(umask) if self._acl_umask else _NO_UMASK

    def _set_secctx(self, fd: int, secctx: SecCtx, undo: tuple[int, bytes, bool] | None
                    ) -> None:
        """Label a new inode with the guest LSM's context; on failure remove the inode
        (`undo` = parent fd, name, is_dir) and raise."""
        if secctx is None or not self.options.security_label:
            return
        name, value = secctx
        if self._xmap is not None:
            name = self._xmap.to_host(name)
        try:
            os.setxattr(f"/proc/self/fd/{fd}", name, value, 0)
        except OSError:
            if undo is not None:
                pfd, entry_name, is_dir = undo
                try:
                    if is_dir:
                        os.rmdir(entry_name, dir_fd=pfd)
                    else:
                        os.unlink(entry_name, dir_fd=pfd)
                except OSError:
                    pass
            raise

    def _kill_suidgid(self, fd: int) -> None:
        """What the kernel does on write/truncate/chown by an unprivileged user: drop suid,
        and sgid when group-executable (FUSE_HANDLE_KILLPRIV_V2 leaves it to us)."""
        st = os.fstat(fd)
        mode = st.st_mode
        if not stat.S_ISREG(mode) or not mode & _SUID_SGID:
            return
        new = mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            new &= ~stat.S_ISGID
        if new != mode:
            os.chmod(b"%d" % fd, stat.S_IMODE(new), dir_fd=self._proc_fd)

    def _open_flags(self, flags: int) -> int:
        f = flags & self._open_keep
        if self._writeback:
            # The guest page cache reads around partial writes and owns append offsets.
            if f & os.O_ACCMODE == os.O_WRONLY:
                f = (f & ~os.O_ACCMODE) | os.O_RDWR
            f &= ~os.O_APPEND
        return f | os.O_CLOEXEC

    def _reopen_regular(self, opath: int, flags: int) -> int:
        """Open the regular file behind an O_PATH fd (never any other file type)."""
        mode = os.fstat(opath).st_mode
        if not stat.S_ISREG(mode):
            if stat.S_ISDIR(mode):
                raise OSError(errno.EISDIR, "is a directory")
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, "is a symlink")
            raise OSError(errno.ENXIO, "not a regular file")
        return os.open(b"%d" % opath, flags & ~os.O_NOFOLLOW, dir_fd=self._proc_fd)

    def _create_perm(self, mode: int, umask: int) -> int:
        perm = mode & 0o7777
        if self._acl_umask:
            return perm  # the process umask is the request's (see _umask)
        return perm & ~umask if self._dont_mask else perm

    # ------------------------------------------------------------------ inodes
    def lookup(self, parent: int, name: bytes) -> Entry:
        check_lookup_name(name)
        pfd = self.inodes.fd(parent)
        if name == b"." or (name == b".." and parent == ROOT_ID):
            # ".." of the export root is the root: never climb out.
            return self._ref_self(parent, pfd)
        return self._entry_of(os.open(name, _O_PATH, dir_fd=pfd), parent)

    def getattr(self, nodeid: int, fh: int | None) -> os.stat_result:
        if fh is not None:
            h = self.handles.find(fh)
            if h is not None and h.nodeid == nodeid:
                return os.fstat(h.fd)
        return os.fstat(self.inodes.fd(nodeid))

    def setattr(self, nodeid: int, attr: SetAttr) -> os.stat_result:
        if self.readonly:
            raise _erofs()
        valid = attr.valid
        fd = self.inodes.fd(nodeid)
        h = self.handles.find(attr.fh) if valid & abi.FATTR_FH else None
        if h is not None and (h.nodeid != nodeid or h.is_dir):
            h = None  # the guest's fh is only a hint; the nodeid is authoritative
        if valid & abi.FATTR_MODE:
            if h is not None:
                os.fchmod(h.fd, attr.mode & 0o7777)
            else:
                os.chmod(b"%d" % fd, attr.mode & 0o7777, dir_fd=self._proc_fd)
        if valid & (abi.FATTR_UID | abi.FATTR_GID):
            uid = attr.uid if valid & abi.FATTR_UID else -1
            gid = attr.gid if valid & abi.FATTR_GID else -1
            if self.idmapped:
                uid = self._uids.to_host(uid) if uid != -1 else -1
                gid = self._gids.to_host(gid) if gid != -1 else -1
            syscalls.chown_fd(fd, uid, gid)
        if valid & abi.FATTR_SIZE:
            if attr.size > _OFF_MAX:
                raise OSError(errno.EFBIG, "size too large")
            if h is not None and h.flags & os.O_ACCMODE != os.O_RDONLY:
                os.ftruncate(h.fd, attr.size)
            else:
                wfd = self._reopen_regular(fd, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(wfd, attr.size)
                finally:
                    os.close(wfd)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME):
            omit = (0, syscalls.UTIME_OMIT)
            now = (0, syscalls.UTIME_NOW)
            if valid & abi.FATTR_ATIME_NOW:
                at = now
            elif valid & abi.FATTR_ATIME:
                at = (attr.atime, attr.atimensec)
            else:
                at = omit
            if valid & abi.FATTR_MTIME_NOW:
                mt = now
            elif valid & abi.FATTR_MTIME:
                mt = (attr.mtime, attr.mtimensec)
            else:
                mt = omit
            syscalls.utimens_fd(fd, at, mt)
        if valid & abi.FATTR_KILL_SUIDGID and self._killpriv:
            self._kill_suidgid(fd)
        return os.fstat(fd)

    def readlink(self, nodeid: int) -> bytes:
        return os.readlink(b"", dir_fd=self.inodes.fd(nodeid))

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        st = os.fstat(self.inodes.fd(nodeid))
        if mask & os.W_OK and self.readonly:
            raise _erofs()
        uid, gid = self.host_ids(ctx.uid, ctx.gid) if self.idmapped else (ctx.uid, ctx.gid)
        if not _permits(st, uid, gid, mask):
            raise OSError(errno.EACCES, "permission denied")

    def statfs(self, nodeid: int) -> os.statvfs_result:
        return os.fstatvfs(self.inodes.fd(nodeid))

    # ------------------------------------------------------------------ namespace changes
    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int,
        secctx: SecCtx = None,
    ) -> Entry:
        if self.readonly:
            raise _erofs()
        check_name(name)
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in _FMT_TYPES:
            raise OSError(errno.EINVAL, "bad file type")
        dev = 0
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            dev = _decode_dev(rdev)
            if not self.options.device_allowed(fmt, dev):
                raise OSError(errno.EPERM, "device node refused by allow_devices")
        pfd = self.inodes.fd(parent)
        with self._creds(ctx), self._umask(umask):
            os.mknod(name, fmt | self._create_perm(mode, umask), dev, dir_fd=pfd)
        return self._labelled(pfd, name, parent, secctx, False)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int,
              secctx: SecCtx = None) -> Entry:
        if self.readonly:
            raise _erofs()
        check_name(name)
        pfd = self.inodes.fd(parent)
        with self._creds(ctx), self._umask(umask):
            os.mkdir(name, self._create_perm(mode, umask), dir_fd=pfd)
        return self._labelled(pfd, name, parent, secctx, True)

    def _labelled(self, pfd: int, name: bytes, parent: int, secctx: SecCtx, is_dir: bool
                  ) -> Entry:
        """Look up what a creating op made, after labelling it with `secctx`."""
        if secctx is not None and self.options.security_label:
            opath = os.open(name, _O_PATH, dir_fd=pfd)
            try:
                self._set_secctx(opath, secctx, (pfd, name, is_dir))
            except BaseException:
                os.close(opath)
                raise
            return self._entry_of(opath, parent)
        return self._lookup_at(pfd, name, parent)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes,
                secctx: SecCtx = None) -> Entry:
        if self.readonly:
            raise _erofs()
        check_name(name)
        if not target:
            raise OSError(errno.ENOENT, "empty symlink target")
        if len(target) >= _PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        pfd = self.inodes.fd(parent)
        with self._creds(ctx):
            os.symlink(target, name, dir_fd=pfd)
        return self._labelled(pfd, name, parent, secctx, False)

    def link(self, nodeid: int, newparent: int, newname: bytes) -> Entry:
        if self.readonly:
            raise _erofs()
        check_name(newname)
        fd = self.inodes.fd(nodeid)
        pfd = self.inodes.fd(newparent)
        # linkat via the magic link links the inode itself (a symlink stays a symlink).
        os.link(b"%d" % fd, newname, src_dir_fd=self._proc_fd, dst_dir_fd=pfd,
                follow_symlinks=True)
        return self._lookup_at(pfd, newname, newparent)

    def unlink(self, parent: int, name: bytes) -> None:
        if self.readonly:
            raise _erofs()
        check_name(name)
        os.unlink(name, dir_fd=self.inodes.fd(parent))

    def rmdir(self, parent: int, name: bytes) -> None:
        if self.readonly:
            raise _erofs()
        check_name(name)
        os.rmdir(name, dir_fd=self.inodes.fd(parent))

    def rename(
        self, olddir: int, oldname: bytes, newdir: int, newname: bytes, flags: int
    ) -> None:
        if self.readonly:
            raise _erofs()
        check_name(oldname)
        check_name(newname)
        # RENAME_WHITEOUT (overlayfs in the guest) leaves a 0:0 character device behind:
        # the host kernel checks the flag combinations.
        if flags & ~(abi.RENAME_NOREPLACE | abi.RENAME_EXCHANGE | abi.RENAME_WHITEOUT):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if flags & abi.RENAME_WHITEOUT and not self.options.device_allowed(stat.S_IFCHR, 0):
            raise OSError(errno.EPERM, "whiteout refused by allow_devices")
        ofd = self.inodes.fd(olddir)
        nfd = self.inodes.fd(newdir)
        if flags:
            syscalls.renameat2(ofd, oldname, nfd, newname, flags)
        else:
            os.rename(oldname, newname, src_dir_fd=ofd, dst_dir_fd=nfd)

    # ------------------------------------------------------------------ files
    def open(self, nodeid: int, flags: int, kill_priv: bool = False) -> Opened:
        oflags = self._open_flags(flags)
        if self.readonly and (oflags & os.O_ACCMODE != os.O_RDONLY or oflags & os.O_TRUNC):
            raise _erofs()
        fd = self._reopen_regular(self.inodes.fd(nodeid), oflags)
        if kill_priv and self._killpriv and oflags & os.O_TRUNC:
            try:
                self._kill_suidgid(fd)
            except BaseException:
                os.close(fd)
                raise
        return Opened(self.handles.add(Handle(fd, nodeid, oflags, False)), self._file_fopen)

    def create(
        self, ctx: Context, parent: int, name: bytes, mode: int, flags: int, umask: int,
        kill_priv: bool = False, secctx: SecCtx = None,
    ) -> tuple[Entry, Opened]:
        if self.readonly:
            raise _erofs()
        check_name(name)
        pfd = self.inodes.fd(parent)
        oflags = self._open_flags(flags)
        try:
            # O_EXCL first: an existing name is never opened blindly (it may be a FIFO or a
            # device node, whose open could block or act on the host).
            with self._creds(ctx), self._umask(umask):
                fd = os.open(name, oflags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             self._create_perm(mode, umask), dir_fd=pfd)
            try:
                self._set_secctx(fd, secctx, (pfd, name, False))
                opath, st = self._opath_of_created(pfd, name, fd)
            except BaseException:
                os.close(fd)
                raise
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd, opath = self._open_existing(ctx, pfd, name, oflags)
            st = None
            if kill_priv and self._killpriv and oflags & os.O_TRUNC:
                self._kill_suidgid(fd)
        try:
            entry = self._entry_of(opath, parent, st)
        except BaseException:
            os.close(fd)
            raise
        fh = self.handles.add(Handle(fd, entry.nodeid, oflags, False))
        return entry, Opened(fh, self._file_fopen)

    def _opath_of_created(self, pfd: int, name: bytes, fd: int) -> tuple[int, os.stat_result]:
        """(an O_PATH fd, stat) of the file `fd` that was just created as `name` in `pfd`.
        Resolving the name again is 0.6 µs cheaper than reopening /proc/self/fd/N, but a
        host process may have renamed or replaced it meanwhile: the two must be one inode
        (`fd` keeps it alive, so no other inode has its (st_dev, st_ino)); else /proc."""
        st = os.fstat(fd)
        try:
            opath = os.open(name, _O_PATH, dir_fd=pfd)
        except OSError:
            pass
        else:
            try:
                ost = os.fstat(opath)
            except BaseException:
                os.close(opath)
                raise
            if ost.st_ino == st.st_ino and ost.st_dev == st.st_dev:
                return opath, ost
            os.close(opath)
        return os.open(b"%d" % fd, os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc_fd), st

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int,
        secctx: SecCtx = None,
    ) -> tuple[Entry, Opened]:
        if self.readonly:
            raise _erofs()
        oflags = self._open_flags(flags) & ~(os.O_TRUNC | os.O_APPEND)
        if oflags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EINVAL, "O_TMPFILE needs write access")
        pfd = self.inodes.fd(parent)
        with self._creds(ctx), self._umask(umask):
            fd = os.open(".", oflags | os.O_TMPFILE, self._create_perm(mode, umask), dir_fd=pfd)
        try:
            self._set_secctx(fd, secctx, None)
            opath = os.open(b"%d" % fd, os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc_fd)
            entry = self._entry_of(opath)
        except BaseException:
            os.close(fd)
            raise
        fh = self.handles.add(Handle(fd, entry.nodeid, oflags, False))
        return entry, Opened(fh, self._file_fopen)

    def _open_existing(self, ctx: Context, pfd: int, name: bytes, oflags: int) -> tuple[int, int]:
        """CREATE without O_EXCL on an existing name: open it as OPEN would, after checking
        the caller's permission (the guest skips that check for FUSE creates)."""
        opath = os.open(name, _O_PATH, dir_fd=pfd)
        try:
            st = os.fstat(opath)
            acc = oflags & os.O_ACCMODE
            mask = (os.R_OK if acc != os.O_WRONLY else 0) | (os.W_OK if acc != os.O_RDONLY else 0)
            if oflags & os.O_TRUNC:
                mask |= os.W_OK
            uid, gid = self.host_ids(ctx.uid, ctx.gid) if self.idmapped else ctx[:2]
            if stat.S_ISREG(st.st_mode) and not _permits(st, uid, gid, mask):
                raise OSError(errno.EACCES, "permission denied")
            return self._reopen_regular(opath, oflags), opath
        except BaseException:
            os.close(opath)
            raise

    def read(self, nodeid: int, fh: int, offset: int, bufs: list[memoryview]) -> int:
        h = self.handles.find(fh)
        if h is not None:
            return self._read(h.fd, h.is_dir, offset, bufs)
        fd, is_dir = LENDING.borrow(fh)  # another worker's handle (the owner was busy)
        try:
            return self._read(fd, is_dir, offset, bufs)
        finally:
            os.close(fd)

    @staticmethod
    def _read(fd: int, is_dir: bool, offset: int, bufs: list[memoryview]) -> int:
        if is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if not bufs:
            return 0
        if offset > _OFF_MAX:
            raise OSError(errno.EINVAL, "offset out of range")
        return os.preadv(fd, bufs, offset)

    def write(
        self, nodeid: int, fh: int, offset: int, bufs: list[memoryview], write_flags: int
    ) -> int:
        if self.readonly:
            raise _erofs()
        h = self.handles.find(fh)
        if h is not None:
            return self._write(h.fd, h.is_dir, offset, bufs, write_flags)
        fd, is_dir = LENDING.borrow(fh)
        try:
            return self._write(fd, is_dir, offset, bufs, write_flags)
        finally:
            os.close(fd)

    def _write(self, fd: int, is_dir: bool, offset: int, bufs: list[memoryview],
               write_flags: int) -> int:
        if is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if not bufs:
            return 0
        if offset > _OFF_MAX:
            raise OSError(errno.EINVAL, "offset out of range")
        if write_flags & _WRITE_KILL_SUIDGID:
            # Set by an unprivileged writer's kernel when it cannot clear suid/sgid itself:
            # with killpriv_v2, and for direct I/O (cache never/metadata) in any case.
            self._kill_suidgid(fd)
        # An O_APPEND fd appends whatever the offset (Linux pwrite semantics), as the guest
        # expects without writeback caching.
        return os.pwritev(fd, bufs, offset)

    def flush(self, nodeid: int, fh: int, lock_owner: int) -> None:
        # close() of a duplicate runs the file system's flush (NFS, POSIX lock release)
        # without losing the handle, as virtiofsd does.
        os.close(os.dup(self.handles.get(fh).fd))
        # A close by the lock owner drops all its POSIX locks on the inode (POSIX).
        self.locks.flush(nodeid, lock_owner)

    def release(self, nodeid: int, fh: int, flags: int, release_flags: int) -> None:
        h = self.handles.pop(fh)
        self.locks.release(fh)
        os.close(h.fd)  # flock locks go with the fd (FUSE_RELEASE_FLOCK_UNLOCK)

    def fsync(self, nodeid: int, fh: int, datasync: bool) -> None:
        fd = self.handles.get(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        if self.readonly:
            raise _erofs()
        if offset > _OFF_MAX or length > _OFF_MAX:
            raise OSError(errno.EINVAL, "offset out of range")
        syscalls.fallocate(self.handles.get(fh).fd, mode, offset, length)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        if offset > _OFF_MAX or whence not in (0, 1, 2, os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "bad lseek")
        return os.lseek(self.handles.get(fh).fd, offset, whence)

    def copy_file_range(
        self, fh_in: int, off_in: int, nodeid_out: int, fh_out: int, off_out: int,
        length: int, flags: int,
    ) -> int:
        if self.readonly:
            raise _erofs()
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range flags")
        src = self.handles.get(fh_in)
        if off_in > _OFF_MAX or off_out > _OFF_MAX:
            raise OSError(errno.EINVAL, "offset out of range")
        dst = self.handles.find(fh_out)
        if dst is not None and dst.nodeid == nodeid_out:
            return os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)
        # The destination is open in another worker: borrow its description, or (a handle
        # that cannot be lent) write through one of our own (the guest checked that its
        # file is open for writing).
        try:
            wfd, _is_dir = LENDING.borrow(fh_out)
        except OSError:
            wfd = self._reopen_regular(self.inodes.fd(nodeid_out), os.O_WRONLY | os.O_CLOEXEC)
        try:
            return os.copy_file_range(src.fd, wfd, length, off_in, off_out)
        finally:
            os.close(wfd)

    def syncfs(self, nodeid: int) -> None:
        syscalls.syncfs(self._root_mount_fd)

    # ------------------------------------------------------------------ directories
    def opendir(self, nodeid: int, flags: int) -> Opened:
        fd = os.open(".", _O_DIR, dir_fd=self.inodes.fd(nodeid))
        return Opened(self.handles.add(Handle(fd, nodeid, _O_DIR, True)), self._dir_fopen)

    def _dir_handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if not h.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory handle")
        return h

    def readdir(self, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        """Host entries from cookie `offset` on; cookies are the host's own d_off values
        (stable, non-zero, and what telldir/seekdir use), so no per-handle snapshot."""
        h = self._dir_handle(fh)
        os.lseek(h.fd, offset - (1 << 64) if offset > _OFF_MAX else offset, os.SEEK_SET)
        return self._dirents(h.fd)

    def _dirents(self, fd: int) -> Iterator[DirEntry]:
        buf = self._dirbuf
        unpack = _DIRENT64.unpack_from
        while True:
            n = syscalls.getdents64(fd, buf)
            if n == 0:
                return
            data = ctypes.string_at(buf, n)
            pos = 0
            while pos < n:
                ino, off, reclen, dtype = unpack(data, pos)
                end = data.index(b"\0", pos + 19, pos + reclen)
                yield ino, off, dtype, data[pos + 19:end]
                pos += reclen

    def readdir_lookup(self, nodeid: int, fh: int, name: bytes) -> Entry:
        check_lookup_name(name)
        return self._lookup_at(self._dir_handle(fh).fd, name, nodeid)

    def releasedir(self, nodeid: int, fh: int) -> None:
        os.close(self.handles.pop(fh).fd)

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool) -> None:
        fd = self._dir_handle(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    # ------------------------------------------------------------------ xattrs
    def _xattr_path(self, nodeid: int) -> str:
        if not self.options.xattr_enabled:
            raise OSError(errno.ENOSYS, "xattrs disabled")
        # Path ops on the magic link reach the inode itself, symlinks included.
        return f"/proc/self/fd/{self.inodes.fd(nodeid)}"

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name:
            raise OSError(errno.EINVAL, "empty xattr name")
        if len(name) > _XATTR_NAME_MAX:
            raise OSError(errno.ERANGE, "xattr name too long")

    def _host_xattr(self, name: bytes) -> bytes:
        self._check_xattr_name(name)
        if self._xmap is not None:
            name = self._xmap.to_host(name)
            if len(name) > _XATTR_NAME_MAX:
                raise OSError(errno.ERANGE, "mapped xattr name too long")
        return name

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int,
                 xflags: int = 0) -> None:
        path = self._xattr_path(nodeid)
        if self.readonly:
            raise _erofs()
        host_name = self._host_xattr(name)
        if len(value) > _XATTR_SIZE_MAX:
            raise OSError(errno.E2BIG, "xattr value too large")
        if flags & ~_XATTR_FLAGS:  # the u32 from the guest may not fit os.setxattr's C int
            raise OSError(errno.EINVAL, "unknown setxattr flags")
        os.setxattr(path, host_name, value, flags)
        if xflags & abi.FUSE_SETXATTR_ACL_KILL_SGID and name == _ACL_ACCESS:
            # The caller may not keep sgid (not in the group, no CAP_FSETID): as the kernel
            # does for a chmod, drop it now that the ACL rewrote the mode bits.
            mode = os.stat(path).st_mode
            if mode & stat.S_ISGID:
                os.chmod(path, stat.S_IMODE(mode) & ~stat.S_ISGID)

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        path = self._xattr_path(nodeid)
        try:
            host_name = self._host_xattr(name)
        except PermissionError as e:
            raise OSError(errno.ENODATA, "no such attribute") from e  # as virtiofsd
        return os.getxattr(path, host_name)

    def listxattr(self, nodeid: int) -> bytes:
        names = os.listxattr(self._xattr_path(nodeid))
        if self._xmap is None:
            return b"".join(os.fsencode(n) + b"\0" for n in names)
        out = []
        for n in names:
            guest = self._xmap.to_guest(os.fsencode(n))
            if guest is not None:
                out.append(guest + b"\0")
        return b"".join(out)

    def removexattr(self, nodeid: int, name: bytes) -> None:
        path = self._xattr_path(nodeid)
        if self.readonly:
            raise _erofs()
        os.removexattr(path, self._host_xattr(name))

    # ------------------------------------------------------------------ locks
    def _inode_key(self, nodeid: int) -> tuple[int, int]:
        st = os.fstat(self.inodes.fd(nodeid))
        return st.st_dev, st.st_ino

    def _lock_ofd(self, nodeid: int) -> int:
        """A new open file description of the file, for one lock owner's OFD locks."""
        opath = self.inodes.fd(nodeid)
        for mode in (os.O_RDWR, os.O_RDONLY, os.O_WRONLY):
            try:
                return self._reopen_regular(opath, mode | os.O_CLOEXEC | os.O_NONBLOCK)
            except (PermissionError, OSError) as e:
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
                    raise
                last = e
        raise last

    def _fh_fd(self, fh: int) -> int:
        h = self.handles.get(fh)
        if h.is_dir:
            raise OSError(errno.EBADF, "lock on a directory handle")
        return h.fd

    def getlk(self, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        self.handles.get(fh)
        return self.locks.getlk(nodeid, owner, lock)

    def setlk(self, nodeid: int, fh: int, owner: int, lock: Lock, flock: bool, sleep: bool
              ) -> Waiter | None:
        h = self.handles.get(fh)
        if h.nodeid != nodeid:
            raise OSError(errno.EBADF, "fh of another inode")
        return self.locks.setlk(nodeid, fh, owner, lock, flock, sleep)

    def lock_done(self, waiter: Waiter, discard: bool = False) -> None:
        self.locks.waiter_done(waiter, discard)
