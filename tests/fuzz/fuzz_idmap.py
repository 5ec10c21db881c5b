"""The uid/gid translation parser and lookups (`vfsd/fuse/idmap.py`).

Input: four u32 ids to translate, then the entries, one per line (UTF-8, bad bytes
replaced). Documented errors: `IdMapError` from the parser; `OSError(EPERM)` from `to_host`
for a forbidden guest id. Invariants: translations are 32-bit ids; an id no entry covers is
unchanged; with only `map` entries, `to_guest(to_host(id)) == id` for the ids they cover.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from tests.fuzz.harness import Broken, Reader, Writer
from vfsd.fuse.idmap import IdMap, IdMapError

MAX_LEN = 1024
_TOP = (1 << 32) - 1


def one_input(data: bytes) -> None:
    r = Reader(data)
    ids = [r.u32() for _ in range(4)] + [0, 1, 1000, _TOP]
    specs = r.rest().decode("utf-8", "replace").split("\n")
    try:
        idmap = IdMap(specs)
    except IdMapError:
        return
    only_maps = all(spec.startswith("map:") for spec in specs)
    covered = [(int(g), int(g) + int(n)) for g, _h, n in (s.split(":")[1:] for s in specs)
               ] if only_maps else []
    for ident in ids:
        try:
            host = idmap.to_host(ident)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise Broken(f"to_host({ident}): errno {e.errno}") from e
            continue
        guest = idmap.to_guest(ident)
        for what, value in (("to_host", host), ("to_guest", guest)):
            if type(value) is not int or not 0 <= value <= _TOP:
                raise Broken(f"{specs}: {what}({ident}) = {value!r}")
        if any(a <= ident < b for a, b in covered) and idmap.to_guest(host) != ident:
            raise Broken(f"{specs}: {ident} -> host {host} -> guest {idmap.to_guest(host)}")


def seeds() -> Iterator[bytes]:
    for specs in (
        ["map:1000:100000:65536"],
        ["map:0:100000:1", "map:1:200000:1000"],
        ["guest:0:1000:1", "host:1000:0:1"],
        ["squash-guest:0:65534:4294967295"],
        ["squash-host:100000:1000:65536", "forbid-guest:0:1"],
        ["forbid-guest:1000:10", "map:1005:0:1"],
        ["map:4294967295:0:1"],
        ["bogus:1:2:3", "map::1:1"],
    ):
        yield Writer().u32(0).u32(1000).u32(100000).u32(1005).raw(
            "\n".join(specs).encode()).getvalue()
