"""Pieces every fuzz target shares: the input reader/writer, invariant failures, fd checks.

A target turns any byte string into a run of the code under test. Structured inputs are read
with `Reader`, which never runs out (missing bytes read as zeros), so every input is valid
and the fuzzer only steers values; seeds are written with `Writer` in the same layout.

A crash is any exception a target lets through: the documented error types of the code
under test are caught inside the target, everything else (and `Broken`, raised when an
invariant does not hold) reaches atheris, which saves the input and stops.
"""

from __future__ import annotations

import os
import struct

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Broken(AssertionError):
    """An invariant of the code under test does not hold for this input."""


class Reader:
    """Sequential little-endian reads from a fuzz input; past the end everything is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


class Writer:
    """Builds seeds in the layout `Reader` reads."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self.parts.append(bytes([v]))
        return self

    def u16(self, v: int) -> Writer:
        self.parts.append(_U16.pack(v))
        return self

    def u32(self, v: int) -> Writer:
        self.parts.append(_U32.pack(v))
        return self

    def u64(self, v: int) -> Writer:
        self.parts.append(_U64.pack(v))
        return self

    def raw(self, data: bytes) -> Writer:
        self.parts.append(bytes(data))
        return self

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def close_owned(fds: tuple[int, ...] | list[int]) -> None:
    """Close fds the code under test handed back to us; EBADF means it closed one it had
    given away (a double close: the number may already belong to someone else)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:
            raise Broken(f"fd {fd} handed to the caller was already closed") from e
