"""File-handle ownership: the worker that opened a file owns its fh.

The owner's index sits in the high bits so the supervisor can route every fh-carrying op
(READ, WRITE, RELEASE, ...) without a table lookup.
"""

FH_OWNER_SHIFT = 48
FH_LOCAL_MASK = (1 << FH_OWNER_SHIFT) - 1
MAX_WORKERS = 255


def make_fh(owner: int, local: int) -> int:
    """Encode a worker-local handle number as the fh the guest sees."""
    return ((owner + 1) << FH_OWNER_SHIFT) | (local & FH_LOCAL_MASK)


def fh_owner(fh: int) -> int:
    """The worker index that owns `fh`, or -1 if the fh carries none (never issued by us)."""
    return ((fh >> FH_OWNER_SHIFT) & 0xFF) - 1


def fh_local(fh: int) -> int:
    return fh & FH_LOCAL_MASK
