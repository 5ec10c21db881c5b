"""Inputs the fuzzers found in workers/server.py, as regression tests. S1: a READ of size 0
with no room for the out header raised IndexError in _put_header (answered by the catch-all)
or claimed 16 bytes it had not written; it is now EIO, or nothing without room for a
header. The other fixed crashes have their regression tests next to the code's other tests
(test_config.py, test_fuse_idmap.py, test_fuse_abi.py)."""

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
