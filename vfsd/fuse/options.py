"""File-system options that shape the FUSE session and the passthrough behaviour.

Names and defaults follow virtiofsd (`--cache`, `--xattr`, `--readonly`, `--writeback`,
`--allow-direct-io`...) so the config layer can map virtiofsd flags onto them one to one.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Literal

from vfsd.fuse import abi
from vfsd.fuse.idmap import IdMap
from vfsd.fuse.xattrmap import XattrMap

CacheMode = Literal["never", "auto", "metadata", "always"]
HandleMode = Literal["never", "prefer", "mandatory"]
DeviceMode = Literal["all", "whiteouts", "none"]

CACHE_MODES = ("never", "auto", "metadata", "always")
HANDLE_MODES = ("never", "prefer", "mandatory")
DEVICE_MODES = ("all", "whiteouts", "none")

#: Entry/attribute validity (seconds) per cache mode, as virtiofsd: never 0, auto 1 s,
#: metadata and always 1 day.
_TIMEOUTS: dict[str, float] = {"never": 0.0, "auto": 1.0, "metadata": 86400.0,
                               "always": 86400.0}
#: FOPEN_* for regular files / directories per cache mode (virtiofsd's choices).
_FILE_FOPEN = {"never": abi.FOPEN_DIRECT_IO, "auto": 0, "metadata": abi.FOPEN_DIRECT_IO,
               "always": abi.FOPEN_KEEP_CACHE}
_DIR_FOPEN = {"never": 0, "auto": 0, "metadata": abi.FOPEN_CACHE_DIR,
              "always": abi.FOPEN_CACHE_DIR}


@dataclass(frozen=True, slots=True)
class FsOptions:
    shared_dir: str
    #: never: no guest caching (timeouts 0, FOPEN_DIRECT_IO); auto: 1 s timeouts; metadata:
    #: 1 day timeouts, file data uncached (DIRECT_IO); always: 1 day timeouts + KEEP_CACHE
    #: (the host is assumed not to change behind the guest's back).
    cache: CacheMode = "auto"
    #: Extended attributes; off (as in virtiofsd) makes every xattr op ENOSYS.
    xattr: bool = False
    #: virtiofsd-syntax xattr name mapping (vfsd/fuse/xattrmap.py); None = names unchanged.
    xattrmap: str | None = None
    #: POSIX ACLs (FUSE_POSIX_ACL: the guest enforces ACLs; creates honour default ACLs and
    #: the caller's umask). Implies xattr.
    posix_acl: bool = False
    #: Security labels of new inodes (FUSE_SECURITY_CTX): the context the guest LSM sends
    #: with a create is stored as that xattr.
    security_label: bool = False
    readonly: bool = False
    #: Character/block device nodes the guest may create (MKNOD, RENAME_WHITEOUT): all (as
    #: virtiofsd), whiteouts (only 0:0 character devices, overlayfs' whiteouts), none;
    #: the others are refused with EPERM.
    allow_devices: DeviceMode = "all"
    #: Offer WRITEBACK_CACHE (the guest kernel then owns size/mtime while writing).
    writeback: bool = False
    #: Pass the guest's O_DIRECT on to the host open (else stripped, as virtiofsd).
    allow_direct_io: bool = False
    readdirplus: bool = True
    #: FUSE_HANDLE_KILLPRIV_V2: the server clears suid/sgid on write/truncate/chown.
    killpriv_v2: bool = False
    #: FUSE_SUBMOUNTS: mount points inside the export become guest submounts (own st_dev).
    announce_submounts: bool = False
    #: never: O_PATH fds only (one worker); prefer: file handles when the file system has
    #: them; mandatory: refuse to serve inodes without handles.
    inode_file_handles: HandleMode = "mandatory"
    translate_uid: tuple[str, ...] = ()
    translate_gid: tuple[str, ...] = ()
    #: Keep the guest's O_NOATIME (else stripped, as virtiofsd).
    preserve_noatime: bool = False
    #: FUSE_POSIX_LOCKS (fcntl locks kept on the host) and FUSE_FLOCK_LOCKS (flock).
    posix_lock: bool = True
    flock: bool = True

    def __post_init__(self) -> None:
        if self.cache not in _TIMEOUTS:
            raise ValueError(f"cache must be one of {'|'.join(CACHE_MODES)}, not {self.cache!r}")
        if self.inode_file_handles not in HANDLE_MODES:
            raise ValueError(f"inode_file_handles must be one of {'|'.join(HANDLE_MODES)}")
        if self.allow_devices not in DEVICE_MODES:
            raise ValueError(f"allow_devices must be one of {'|'.join(DEVICE_MODES)}")
        if not self.shared_dir:
            raise ValueError("shared_dir must be set")
        if self.xattrmap is not None:
            XattrMap(self.xattrmap)  # raises XattrMapError (a ValueError)
        IdMap(self.translate_uid)
        IdMap(self.translate_gid)

    @property
    def timeout(self) -> float:
        """Entry and attribute validity, in seconds."""
        return _TIMEOUTS[self.cache]

    @property
    def file_open_flags(self) -> int:
        """FOPEN_* for regular files opened or created."""
        return _FILE_FOPEN[self.cache]

    @property
    def dir_open_flags(self) -> int:
        return _DIR_FOPEN[self.cache]

    def device_allowed(self, fmt: int, rdev: int) -> bool:
        """The guest may create a device node of type `fmt` (S_IFCHR/S_IFBLK) and number
        `rdev`; a 0:0 character device is a whiteout, which opens no device."""
        if self.allow_devices == "all":
            return True
        return self.allow_devices == "whiteouts" and fmt == stat.S_IFCHR and rdev == 0

    @property
    def xattr_enabled(self) -> bool:
        """Xattr ops are served (posix_acl needs them)."""
        return self.xattr or self.posix_acl
