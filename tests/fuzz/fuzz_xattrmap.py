"""The xattrmap parser and its name translation (`vfsd/fuse/xattrmap.py`).

Input: `u16 length`, that many bytes of mapping text (UTF-8, bad bytes replaced), then
NUL-separated xattr names. Documented errors: `XattrMapError` from the parser; `OSError`
EPERM or ENOTSUP from `to_host`. Invariants: `to_host` gives bytes, `to_guest` bytes or
None; with a single `map` rule every non-empty name the guest may use comes back unchanged
from the host (`to_guest(to_host(name)) == name`), which is what `map` is for.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from tests.fuzz.harness import Broken, Reader, Writer
from vfsd.fuse.xattrmap import XattrMap, XattrMapError, parse

MAX_LEN = 4096


def _is_single_map(xmap: XattrMap) -> bool:
    """The rules are exactly what one `map` rule expands to."""
    first = xmap.rules[0]
    key, prepend = first.key.decode(), first.prepend.decode()
    sep = next((c for c in ":/|;," if c not in key + prepend), None)
    return sep is not None and xmap.rules == parse(f"{sep}map{sep}{key}{sep}{prepend}{sep}")


def one_input(data: bytes) -> None:
    r = Reader(data)
    text = r.take(min(r.u16(), r.left)).decode("utf-8", "replace")
    names = r.rest().split(b"\0")
    try:
        xmap = XattrMap(text)
    except XattrMapError:
        return
    single_map = _is_single_map(xmap)
    for name in names:
        try:
            host = xmap.to_host(name)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP):
                raise Broken(f"to_host({name!r}): errno {e.errno}") from e
            host = None
        if host is not None and type(host) is not bytes:
            raise Broken(f"to_host({name!r}) = {host!r}")
        guest = xmap.to_guest(name)
        if guest is not None and type(guest) is not bytes:
            raise Broken(f"to_guest({name!r}) = {guest!r}")
        if single_map and host is not None and name and xmap.to_guest(host) != name:
            raise Broken(f"{text!r}: {name!r} -> host {host!r} -> guest "
                         f"{xmap.to_guest(host)!r}")


def seeds() -> Iterator[bytes]:
    names = b"\0".join([b"user.a", b"trusted.b", b"security.selinux", b"user.virtiofs.x",
                        b"", b"system.posix_acl_access"])
    for text in (
        ":map:trusted.:user.virtiofs.:",
        ":map::user.virtiofs.:",
        ":prefix:all:trusted.:user.virtiofs.: :bad:all:::",
        ":prefix:client:trusted.:user.virtiofs.:\n:prefix:server::user.virtiofs.:"
        "\n:ok:all:::",
        "/unsupported/all/security.capability//\n/ok/all/user./user./\n/bad/server///",
        ":ok:client:user.::",
        "map:x",
        ":map:a:b: :ok:all:::",
    ):
        raw = text.encode()
        yield Writer().u16(len(raw)).raw(raw).raw(names).getvalue()
