"""Extended-attribute name mapping between guest and host (virtiofsd's `xattrmap`).

Grammar (as virtiofsd, C and Rust): a mapping is a sequence of rules; each rule starts with
its own separator character (the first non-blank character) that must then end every field:

    <sep> type <sep> scope <sep> key <sep> prepend <sep>
    <sep> "map" <sep> key <sep> prepend <sep>

Blanks (space, tab, newline) are allowed between rules, not inside fields.

- scope `client` matches `key` against names the guest sends (get/set/removexattr);
  `server` matches `prepend` against names the host lists (listxattr); `all` does both.
- type `prefix`: client names matching `key` get `prepend` put in front; host names starting
  with `prepend` have it stripped. `ok`: the name passes unchanged. `bad`: the guest gets
  EPERM (ENODATA for getxattr), the host name is hidden. `unsupported`: the guest gets
  ENOTSUP, the host name is hidden.
- `map` (only as the last rule) expands to: `prefix all key prepend`, then, if `key` is
  empty, `bad all "" ""`; else `bad server "" key`, `bad client prepend ""`, `ok all "" ""`.

Rules are tried in order; the first match decides. A name no rule matches is refused (EPERM
from the guest, hidden from listings), so a useful map ends with a catch-all rule.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Literal

RuleType = Literal["prefix", "ok", "bad", "unsupported"]
Scope = Literal["client", "server", "all"]
_TYPES = ("prefix", "ok", "bad", "unsupported")
_SCOPES = ("client", "server", "all")
_BLANKS = " \t\r\n"


class XattrMapError(ValueError):
    """The mapping text is malformed; the message says where (rule number, 1-based)."""


@dataclass(frozen=True, slots=True)
class Rule:
    type: RuleType
    client: bool  # scope includes client
    server: bool  # scope includes server
    key: bytes
    prepend: bytes


def _fields(text: str, pos: int, rule_no: int, count: int) -> tuple[list[str], int]:
    sep = text[pos]
    pos += 1
    out = []
    for _ in range(count):
        end = text.find(sep, pos)
        if end < 0:
            raise XattrMapError(f"rule {rule_no}: missing '{sep}' after field {len(out) + 1}")
        out.append(text[pos:end])
        pos = end + 1
    return out, pos


def parse(text: str) -> tuple[Rule, ...]:
    """Parse a mapping; raises XattrMapError naming the bad rule."""
    rules: list[Rule] = []
    pos = 0
    n = 0
    seen_map = False
    while True:
        while pos < len(text) and text[pos] in _BLANKS:
            pos += 1
        if pos >= len(text):
            break
        n += 1
        if seen_map:
            raise XattrMapError(f"rule {n}: 'map' must be the last rule")
        if text[pos].isalnum():
            raise XattrMapError(
                f"rule {n}: starts with {text[pos]!r}; a rule starts with its separator "
                "character, e.g. ':ok:all:::'")
        sep = text[pos]
        typ_end = text.find(sep, pos + 1)
        typ = text[pos + 1:typ_end] if typ_end >= 0 else text[pos + 1:]
        if typ == "map":
            (_, key, prepend), pos = _fields(text, pos, n, 3)
            rules += _expand_map(key.encode(), prepend.encode())
            seen_map = True
            continue
        (typ, scope, key, prepend), pos = _fields(text, pos, n, 4)
        if typ not in _TYPES:
            raise XattrMapError(
                f"rule {n}: unknown type {typ!r} (prefix, ok, bad, unsupported or map)")
        if scope not in _SCOPES:
            raise XattrMapError(f"rule {n}: unknown scope {scope!r} (client, server or all)")
        rules.append(Rule(typ, scope != "server", scope != "client",  # type: ignore[arg-type]
                          key.encode(), prepend.encode()))
    if not rules:
        raise XattrMapError("empty mapping (no rules)")
    return tuple(rules)


def _expand_map(key: bytes, prepend: bytes) -> list[Rule]:
    rules = [Rule("prefix", True, True, key, prepend)]
    if not key:
        rules.append(Rule("bad", True, True, b"", b""))
    else:
        rules += [
            Rule("bad", False, True, b"", key),  # hide unprefixed host names matching key
            Rule("bad", True, False, prepend, b""),  # the guest may not use the prefix itself
            Rule("ok", True, True, b"", b""),
        ]
    return rules


class XattrMap:
    """A parsed mapping: `to_host` for names from the guest, `to_guest` for host listings."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.rules = parse(text)

    def to_host(self, name: bytes) -> bytes:
        """Host name for a guest name; OSError(EPERM or ENOTSUP) if the guest may not use it."""
        for r in self.rules:
            if r.client and name.startswith(r.key):
                if r.type == "prefix":
                    return r.prepend + name
                if r.type == "ok":
                    return name
                if r.type == "bad":
                    raise OSError(errno.EPERM, "xattr name refused by xattrmap")
                raise OSError(errno.ENOTSUP, "xattr name unsupported by xattrmap")
        raise OSError(errno.EPERM, "no xattrmap rule matches")

    def to_guest(self, name: bytes) -> bytes | None:
        """Guest name for a host name, or None if the guest must not see it."""
        for r in self.rules:
            if r.server and name.startswith(r.prepend):
                if r.type == "prefix":
                    return name[len(r.prepend):] or None
                if r.type == "ok":
                    return name
                return None
        return None
