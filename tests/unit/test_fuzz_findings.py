"""Inputs the fuzzers found that break code this branch may not change (workers/server.py),
kept as strict xfails: each passes once the bug is fixed, and then the xfail must go (with
the matching entry of tests/fuzz/fuse_input.py KNOWN_SERVER_BUGS). Crashes that were fixed
have their regression tests next to the code's other tests (test_config.py,
test_fuse_idmap.py, test_fuse_abi.py)."""

from __future__ import annotations

import logging

import pytest

from tests.fuzz import fuse_input
from tests.fuzz.fuzz_fuse_decode import CheckingFs
from vfsd.frontend.fuse_client import build
from vfsd.fuse import abi
from vfsd.fuse.abi import Opcode
from vfsd.fuse.options import FsOptions
from workers.server import FuseServer


@pytest.mark.xfail(strict=True, reason=(
    "S1, workers/server.py: _read puts the out header into the writable part without "
    "checking it has room: a READ of size 0 with no writable buffer raises IndexError in "
    "_put_header (logged by the catch-all, answered with nothing), and one with fewer than "
    "16 writable bytes returns 16 although fewer were written"))
@pytest.mark.parametrize("writable", [[], [8]], ids=["no-writable-part", "8-byte-part"])
def test_read_of_size_zero_without_room_for_the_out_header(writable, caplog):
    options = FsOptions(shared_dir="/export")
    server = FuseServer(CheckingFs(), options, session=fuse_input.session(0, options))
    request = build(Opcode.READ, 2, abi.READ_IN.pack(5, 0, 0, 0, 0, 0, 0))
    views = [memoryview(bytearray(n)) for n in writable]
    with caplog.at_level(logging.ERROR, logger="vfsd.worker.server"):
        n = server.handle([memoryview(request)], views)
    assert not [r for r in caplog.records if r.exc_info], "the catch-all logged a bug"
    assert n <= sum(writable)
