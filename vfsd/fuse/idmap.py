"""UID/GID translation between guest and host (virtiofsd's `--translate-uid/--translate-gid`).

Each entry is one string (virtiofsd's forms; counts are range lengths):

    map:<guest>:<host>:<count>              guest range <-> host range, both directions
    guest:<guest>:<host>:<count>            guest range  -> host range only
    host:<host>:<guest>:<count>             host range   -> guest range only
    squash-guest:<guest>:<host>:<count>     every guest id of the range -> one host id
    squash-host:<host>:<guest>:<count>      every host id of the range  -> one guest id
    forbid-guest:<guest>:<count>            guest ids of the range may not be used (EPERM)

Ids no entry covers pass through unchanged. Ranges of one direction must not overlap.
Guest -> host applies to the caller of creating ops (owner of new files) and to chown
targets; host -> guest to every attribute reply (st_uid/st_gid). POSIX ACL entries are not
translated.
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from collections.abc import Iterable

_ID_SPACE = 1 << 32
_FORMS = {"map": 3, "guest": 3, "host": 3, "squash-guest": 3, "squash-host": 3,
          "forbid-guest": 2}


class IdMapError(ValueError):
    """An entry is malformed or overlaps another one."""


class _Ranges:
    """Non-overlapping [start, start+count) ranges -> (target, squash) or None (forbidden)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._items: list[tuple[int, int, int | None, bool]] = []  # start, end, target, squash

    def add(self, start: int, count: int, target: int | None, squash: bool, spec: str) -> None:
        end = start + count
        i = bisect_right(self._starts, start)
        if (i > 0 and self._items[i - 1][1] > start) or (
                i < len(self._items) and self._items[i][0] < end):
            raise IdMapError(f"{spec}: range [{start}, {end}) overlaps an earlier entry")
        self._starts.insert(i, start)
        self._items.insert(i, (start, end, target, squash))

    def __bool__(self) -> bool:
        return bool(self._items)

    def lookup(self, ident: int) -> int:
        i = bisect_right(self._starts, ident) - 1
        if i >= 0:
            start, end, target, squash = self._items[i]
            if ident < end:
                if target is None:
                    raise OSError(errno.EPERM, f"id {ident} is forbidden")
                return target if squash else target + ident - start
        return ident


def _number(text: str, spec: str) -> int:
    # ASCII only: str.isdigit() also accepts '²', which int() refuses.
    if not (text.isascii() and text.isdigit()):
        raise IdMapError(f"{spec}: {text!r} is not an id")
    # Bounded before int(): Python refuses to convert strings of more than 4300 digits.
    digits = text.lstrip("0") or "0"
    value = int(digits) if len(digits) <= 10 else _ID_SPACE
    if value >= _ID_SPACE:
        raise IdMapError(f"{spec}: {value} is not a 32-bit id")
    return value


class IdMap:
    """Translation of one id kind (uids or gids); identity when built from no entries."""

    def __init__(self, specs: Iterable[str] = ()) -> None:
        self.specs = tuple(specs)
        self._to_host = _Ranges()
        self._to_guest = _Ranges()
        for spec in self.specs:
            self._add(spec)

    def _add(self, spec: str) -> None:
        kind, _, rest = spec.partition(":")
        if kind not in _FORMS:
            raise IdMapError(f"{spec}: unknown form {kind!r} (map, guest, host, squash-guest, "
                             "squash-host or forbid-guest)")
        parts = rest.split(":") if rest else []
        if len(parts) != _FORMS[kind]:
            raise IdMapError(f"{spec}: {kind} takes {_FORMS[kind]} numbers")
        nums = [_number(p, spec) for p in parts]
        count = nums[-1]
        if count == 0:
            raise IdMapError(f"{spec}: count must be > 0")
        first = nums[0]
        if first + count > _ID_SPACE:
            raise IdMapError(f"{spec}: range goes past 2^32")
        if kind == "forbid-guest":
            self._to_host.add(first, count, None, False, spec)
            return
        other = nums[1]
        squash = kind.startswith("squash")
        if not squash and other + count > _ID_SPACE:
            raise IdMapError(f"{spec}: target range goes past 2^32")
        if kind in ("map", "guest", "squash-guest"):
            self._to_host.add(first, count, other, squash, spec)
        if kind == "map":
            self._to_guest.add(other, count, first, False, spec)
        elif kind in ("host", "squash-host"):
            self._to_guest.add(first, count, other, squash, spec)

    @property
    def identity(self) -> bool:
        return not self._to_host and not self._to_guest

    def to_host(self, guest_id: int) -> int:
        """Host id for a guest id; OSError(EPERM) if the guest id is forbidden."""
        return self._to_host.lookup(guest_id)

    def to_guest(self, host_id: int) -> int:
        return self._to_guest.lookup(host_id)
