"""translate_uid / translate_gid: virtiofsd's map/squash/forbid forms."""

import errno

import pytest

from vfsd.fuse.idmap import IdMap, IdMapError


def test_identity_by_default():
    m = IdMap()
    assert m.identity and m.to_host(1234) == 1234 and m.to_guest(0) == 0


def test_map_both_directions():
    m = IdMap(["map:1000:5000:10"])
    assert not m.identity
    assert (m.to_host(1000), m.to_host(1009), m.to_host(1010)) == (5000, 5009, 1010)
    assert (m.to_guest(5000), m.to_guest(5005), m.to_guest(1000)) == (1000, 1005, 1000)


def test_one_way_and_squash_forms():
    m = IdMap(["guest:0:100000:1", "host:100000:0:1", "squash-guest:1000:2000:500",
               "squash-host:3000:65534:1000"])
    assert m.to_host(0) == 100000 and m.to_guest(100000) == 0
    assert m.to_host(1000) == m.to_host(1499) == 2000 and m.to_host(1500) == 1500
    assert m.to_guest(3000) == m.to_guest(3999) == 65534 and m.to_guest(2000) == 2000


def test_forbid_guest():
    m = IdMap(["forbid-guest:0:1000", "map:1000:1000:1"])
    with pytest.raises(OSError) as e:
        m.to_host(999)
    assert e.value.errno == errno.EPERM
    assert m.to_host(1000) == 1000 and m.to_host(1001) == 1001


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["frob:1:2:3"], "unknown form 'frob'"),
        (["map:1:2"], "map takes 3 numbers"),
        (["forbid-guest:1:2:3"], "forbid-guest takes 2 numbers"),
        (["map:a:2:3"], "'a' is not an id"),
        (["map:1:2:0"], "count must be > 0"),
        (["map:4294967295:0:2"], "range goes past 2^32"),
        (["map:0:4294967295:2"], "target range goes past 2^32"),
        (["map:4294967296:0:1"], "not a 32-bit id"),
        # Found by fuzzing (tests/fuzz/fuzz_idmap.py): both used to escape as ValueError.
        (["map:\u00b2:0:1"], "is not an id"),  # '²'.isdigit(), but int('²') fails
        (["map:" + "9" * 5000 + ":0:1"], "not a 32-bit id"),  # beyond int()'s 4300 digits
        (["map:" + "0" * 5000 + "7:0:4294967295"], "range goes past 2^32"),  # 7, not 5001 digits
        (["map:0:0:10", "guest:5:100:10"], "overlaps an earlier entry"),
        (["host:0:0:10", "map:100:5:1"], "overlaps an earlier entry"),
        (["forbid-guest:0:1000", "forbid-guest:999:2"], "overlaps"),
    ],
)
def test_errors(specs, message):
    with pytest.raises(IdMapError) as e:
        IdMap(specs)
    assert message in str(e.value)
