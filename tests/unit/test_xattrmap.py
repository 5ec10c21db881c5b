"""xattrmap: virtiofsd's rule grammar, its errors, and the mapping both ways."""

import errno

import pytest

from vfsd.fuse.xattrmap import Rule, XattrMap, XattrMapError, parse


def host(m, name):
    try:
        return m.to_host(name)
    except OSError as e:
        return e.errno


def test_prefix_everything_example():
    # virtiofsd's documented example 1: every guest xattr lives under user.virtiofs.
    m = XattrMap(":prefix:all::user.virtiofs.::bad:all:::")
    assert m.to_host(b"trusted.overlay.x") == b"user.virtiofs.trusted.overlay.x"
    assert m.to_host(b"user.a") == b"user.virtiofs.user.a"
    assert m.to_guest(b"user.virtiofs.security.selinux") == b"security.selinux"
    assert m.to_guest(b"user.other") is None  # host attributes stay hidden
    assert m.to_guest(b"user.virtiofs.") is None


def test_trusted_example_with_newlines_and_other_separator():
    # virtiofsd's documented example 2 ("/" separator, rules on several lines)
    m = XattrMap("""/prefix/all/trusted./user.virtiofs./
                    /bad/server//trusted./
                    /bad/client/user.virtiofs.//
                    /ok/all///""")
    assert m.to_host(b"trusted.x") == b"user.virtiofs.trusted.x"
    assert m.to_host(b"user.plain") == b"user.plain"
    assert host(m, b"user.virtiofs.sneaky") == errno.EPERM
    assert m.to_guest(b"user.virtiofs.trusted.x") == b"trusted.x"
    assert m.to_guest(b"trusted.host_only") is None
    assert m.to_guest(b"security.selinux") == b"security.selinux"


def test_unsupported_type():
    m = XattrMap("/unsupported/all/security.selinux/security.selinux//ok/all///")
    assert host(m, b"security.selinux") == errno.ENOTSUP
    assert m.to_guest(b"security.selinux") is None
    assert m.to_host(b"user.x") == b"user.x"


def test_no_matching_rule_is_refused_and_hidden():
    m = XattrMap(":ok:client:user.::")
    assert m.to_host(b"user.a") == b"user.a"
    assert host(m, b"trusted.a") == errno.EPERM
    assert m.to_guest(b"user.a") is None  # the rule is client-only


def test_map_shorthand_expansion():
    assert parse(":map:trusted.:user.virtiofs.:") == (
        Rule("prefix", True, True, b"trusted.", b"user.virtiofs."),
        Rule("bad", False, True, b"", b"trusted."),
        Rule("bad", True, False, b"user.virtiofs.", b""),
        Rule("ok", True, True, b"", b""),
    )
    assert parse(":map::user.virtiofs.:") == (
        Rule("prefix", True, True, b"", b"user.virtiofs."),
        Rule("bad", True, True, b"", b""),
    )
    m = XattrMap(":map:trusted.:user.virtiofs.:")
    assert m.to_host(b"trusted.a") == b"user.virtiofs.trusted.a"
    assert m.to_host(b"user.b") == b"user.b"
    assert host(m, b"user.virtiofs.x") == errno.EPERM
    assert m.to_guest(b"trusted.a") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty mapping"),
        ("   \n ", "empty mapping"),
        (":prefix:all:key", "rule 1: missing ':' after field 3"),
        (":frob:all:::", "rule 1: unknown type 'frob'"),
        (":ok:everyone:::", "rule 1: unknown scope 'everyone'"),
        (":ok:all::: :map:a:b: :ok:all:::", "rule 3: 'map' must be the last rule"),
        ("ok:all:::", "rule 1: starts with 'o'"),
        (":ok:all::: /bad/client/x/", "rule 2: missing '/' after field 4"),
    ],
)
def test_parse_errors_name_the_rule(text, message):
    with pytest.raises(XattrMapError) as e:
        parse(text)
    assert message in str(e.value)


def test_error_is_a_value_error_and_first_match_wins():
    assert issubclass(XattrMapError, ValueError)
    m = XattrMap(":bad:client:user.secret::   :ok:all:::")
    assert host(m, b"user.secret.key") == errno.EPERM
    assert m.to_host(b"user.public") == b"user.public"
