"""File-handle ownership: the worker that opened a file owns its fh.

The owner's index sits in the high bits so the supervisor can route every fh-carrying op
(READ, WRITE, RELEASE, ...) without a table lookup. The low bits name the owner's lending
slot (workers/passthrough/handles.py): READ and WRITE on an fh with a slot may be served by
another worker that borrows the owner's fd.
"""

FH_OWNER_SHIFT = 48
FH_LOCAL_MASK = (1 << FH_OWNER_SHIFT) - 1
MAX_WORKERS = 255
FH_SLOT_BITS = 12
FH_NO_SLOT = (1 << FH_SLOT_BITS) - 1  # this handle is not lent: its owner serves it


def make_fh(owner: int, local: int) -> int:
    """Encode a worker-local handle number as the fh the guest sees."""
    return ((owner + 1) << FH_OWNER_SHIFT) | (local & FH_LOCAL_MASK)


def fh_owner(fh: int) -> int:
    """The worker index that owns `fh`, or -1 if the fh carries none (never issued by us)."""
    return ((fh >> FH_OWNER_SHIFT) & 0xFF) - 1


def fh_local(fh: int) -> int:
    return fh & FH_LOCAL_MASK


def fh_lendable(fh: int) -> bool:
    return fh & FH_NO_SLOT != FH_NO_SLOT
