"""File-system options that shape the FUSE session and the passthrough behaviour.

Names and defaults follow virtiofsd (`--cache`, `--xattr`, `--readonly`, `--writeback`,
`--allow-direct-io`...) so the config layer can map virtiofsd flags onto them one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vfsd.fuse import abi

CacheMode = Literal["never", "auto", "always"]

#: Entry/attribute validity (seconds) per cache mode (virtiofsd: never 0, auto 1, always 1 day).
_TIMEOUTS: dict[str, float] = {"never": 0.0, "auto": 1.0, "always": 86400.0}


@dataclass(frozen=True, slots=True)
class FsOptions:
    shared_dir: str
    #: never: no guest caching (timeouts 0, FOPEN_DIRECT_IO); auto: 1 s timeouts; always: 1 day
    #: timeouts + KEEP_CACHE (the host is assumed not to change behind the guest's back).
    cache: CacheMode = "auto"
    #: Extended attributes; off (as in virtiofsd) makes every xattr op ENOSYS.
    xattr: bool = False
    readonly: bool = False
    #: MKNOD of character/block devices; refused with EPERM unless set.
    allow_devices: bool = False
    #: Offer WRITEBACK_CACHE (the guest kernel then owns size/mtime while writing).
    writeback: bool = False
    readdirplus: bool = True

    def __post_init__(self) -> None:
        if self.cache not in _TIMEOUTS:
            raise ValueError(f"cache must be one of never|auto|always, not {self.cache!r}")
        if not self.shared_dir:
            raise ValueError("shared_dir must be set")

    @property
    def timeout(self) -> float:
        """Entry and attribute validity, in seconds."""
        return _TIMEOUTS[self.cache]

    @property
    def file_open_flags(self) -> int:
        """FOPEN_* for regular files opened or created."""
        if self.cache == "never":
            return abi.FOPEN_DIRECT_IO
        if self.cache == "always":
            return abi.FOPEN_KEEP_CACHE
        return 0

    @property
    def dir_open_flags(self) -> int:
        return abi.FOPEN_CACHE_DIR if self.cache == "always" else 0
