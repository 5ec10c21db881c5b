"""Validation of path components coming from the guest.

Every name is used as one component relative to a parent fd (`dir_fd=`), so a name that
passes here can never walk anywhere but into the parent directory.
"""

from __future__ import annotations

import errno

NAME_MAX = 255


def check_name(name: bytes) -> bytes:
    """A name that creates, removes or renames an entry: not empty, no '/', not '.' or '..'
    (EINVAL, as virtiofsd), at most NAME_MAX bytes (ENAMETOOLONG)."""
    if not name or b"/" in name or name == b"." or name == b"..":
        raise OSError(errno.EINVAL, "invalid name")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return name


def check_lookup_name(name: bytes) -> bytes:
    """As check_name, but '.' and '..' are allowed (LOOKUP with EXPORT_SUPPORT)."""
    if not name or b"/" in name:
        raise OSError(errno.EINVAL, "invalid name")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return name
