"""Scoped switch to the caller's uid/gid for ops that create inodes, so new files are owned
by the guest caller and the host checks the parent directory's permissions as that caller.

As virtiofsd's `UnixCredentials::set()`: gid is set before uid (after dropping euid 0 we
could no longer change it) and the uid is restored first. Only the effective ids change; the
real/saved ids stay 0, which is what lets us switch back. Supplementary groups are not
switched: the guest's are unknown without CREATE_SUPP_GROUP, and PassthroughFs drops the
process's own at start-up so they grant nothing.
"""

from __future__ import annotations

import os
from types import TracebackType

_EUID = os.geteuid()
_EGID = os.getegid()


class GuestCreds:
    __slots__ = ("_gid", "_switch", "_uid")

    def __init__(self, uid: int, gid: int) -> None:
        self._uid = uid
        self._gid = gid
        # Nothing to do when already running as those ids; impossible unless root.
        self._switch = _EUID == 0 and (uid != _EUID or gid != _EGID)

    def __enter__(self) -> GuestCreds:
        if self._switch:
            os.setresgid(-1, self._gid, -1)
            try:
                os.setresuid(-1, self._uid, -1)
            except OSError:
                os.setresgid(-1, _EGID, -1)
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._switch:
            os.setresuid(-1, _EUID, -1)
            os.setresgid(-1, _EGID, -1)
