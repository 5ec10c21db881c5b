"""Transport layer: vhost-user codec and state machine, guest memory, split virtqueues.

Pure protocol code (stdlib only). The one error hierarchy of the layer lives here so every
module (and the layers above) can catch it without importing the others:

    TransportError
    └── GuestProtocolError          the front-end (QEMU) or the guest driver broke the spec
        ├── VhostUserProtocolError  malformed or illegal vhost-user message
        │   └── FramingError        ... and the byte stream is out of sync (drop the connection)
        ├── GuestMemoryError        an address range outside the memory table
        ├── ChainError              a malformed descriptor chain (see `ChainFault`)
        └── VringError              a broken ring (avail index too far ahead, unmapped ring)

Local bugs are never wrapped into these: a `GuestProtocolError` always means "the other side
did it", so callers may log it and carry on (drop the chain, fail the ack).
"""

from __future__ import annotations

import errno
from enum import Enum


class TransportError(Exception):
    """Base of every error the transport layer raises on purpose."""


class GuestProtocolError(TransportError):
    """The front-end or the guest broke the protocol; `errno_hint` suits a FUSE reply."""

    errno_hint = errno.EIO


class VhostUserProtocolError(GuestProtocolError):
    """A malformed or illegal vhost-user message (size, flags, fd count, index, state)."""

    errno_hint = errno.EPROTO


class FramingError(VhostUserProtocolError):
    """The message stream cannot be resynchronised (bad header, EOF inside a message)."""


class GuestMemoryError(GuestProtocolError):
    """A guest range not inside one memory region, or a region that cannot be mapped."""

    errno_hint = errno.EFAULT


class ChainFault(Enum):
    """What is wrong with a descriptor chain (rust-vmm `virtio-queue` error names in spirit)."""

    BAD_INDEX = "descriptor index >= table size"
    TOO_MANY_DESCRIPTORS = "more hops than the table has entries (loop?)"
    NESTED_INDIRECT = "indirect descriptor inside an indirect table"
    INDIRECT_WITH_NEXT = "INDIRECT and NEXT set on one descriptor"
    BAD_INDIRECT_TABLE = "indirect table length is 0, not a multiple of 16 or > 65536 entries"
    READABLE_AFTER_WRITABLE = "device-readable descriptor after a device-writable one"
    TOO_LONG = "total chain length >= 2^32"
    BAD_ADDRESS = "descriptor range outside guest memory"


class ChainError(GuestProtocolError):
    """A malformed descriptor chain; `fault` says which rule it broke."""

    def __init__(self, fault: ChainFault, detail: str = "") -> None:
        self.fault = fault
        super().__init__(f"{fault.value}: {detail}" if detail else fault.value)


class VringError(GuestProtocolError):
    """The ring itself is unusable (avail index ran ahead, ring outside memory, not set up)."""


__all__ = [
    "ChainError",
    "ChainFault",
    "FramingError",
    "GuestMemoryError",
    "GuestProtocolError",
    "TransportError",
    "VhostUserProtocolError",
    "VringError",
]
