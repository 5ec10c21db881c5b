"""The fuzz targets' checks can fail: each test plants one bug of the kind a target is meant
to catch and shows that the target's `one_input` reports it on a saved seed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz import (
    fuzz_config_yaml,
    fuzz_desc_chain,
    fuzz_fuse_decode,
    fuzz_guest_memory,
    fuzz_idmap,
    fuzz_vhost_backend,
    fuzz_vhost_codec,
    fuzz_xattrmap,
)
from tests.fuzz.harness import Broken
from vfsd.config import SETTINGS
from vfsd.fuse import idmap
from vfsd.fuse.xattrmap import XattrMap
from vfsd.transport import codec, virtqueue
from vfsd.transport.backend import VhostUserBackend
from vfsd.transport.memory import GuestMemory
from workers import server

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"


def seeds(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / target).glob("seed-*"))]


def fails(one_input, inputs: list[bytes]) -> BaseException:  # type: ignore[no-untyped-def]
    for data in inputs:
        try:
            one_input(data)
        except Exception as e:
            return e
    raise AssertionError("no seed made the target report the planted bug")


@pytest.fixture
def server_log() -> Iterator[None]:
    logger = logging.getLogger("vfsd.worker.server")
    logger.addHandler(fuzz_fuse_decode._bugs)
    yield
    logger.removeHandler(fuzz_fuse_decode._bugs)


def test_vhost_codec_reports_leaked_fds(monkeypatch):
    monkeypatch.setattr(codec, "close_fds", lambda fds: None)  # bad messages keep their fds
    data = fuzz_vhost_codec.encode([(codec.encode_request(2, b"\0" * 4), 1)])
    assert "fds left open" in str(fails(fuzz_vhost_codec.one_input, [data]))


def test_vhost_backend_reports_unsolicited_replies(monkeypatch):
    monkeypatch.setattr(VhostUserBackend, "_ack", lambda self, message, ok: codec.encode_ack(
        message.request, ok))
    assert "unsolicited reply" in str(fails(fuzz_vhost_backend.one_input,
                                            seeds("vhost_backend")))


def test_guest_memory_reports_overlapping_regions(monkeypatch):
    monkeypatch.setattr(GuestMemory, "_insert", lambda self, m: (
        self._maps.append(m), self._starts.append(m.gpa)))
    data = (fuzz_guest_memory.Writer().u8(fuzz_guest_memory.ADD).u64(0).u64(0x2000).u64(0)
            .u64(0).u8(fuzz_guest_memory.ADD).u64(0x1000).u64(0x2000).u64(0).u64(0)
            .getvalue())
    assert isinstance(fails(fuzz_guest_memory.one_input, [data]), Broken)


def test_desc_chain_reports_a_linear_walk_that_drops_a_buffer(monkeypatch):
    real = virtqueue._walk_linear

    def lossy(mem, table_view, table_size):  # type: ignore[no-untyped-def]
        got = real(mem, table_view, table_size)
        return None if got is None else (got[0], got[1][:-1], got[2], got[3])

    monkeypatch.setattr(virtqueue, "_walk_linear", lossy)
    fuzz_desc_chain.prepare()
    assert "differ" in str(fails(fuzz_desc_chain.one_input, seeds("desc_chain")))


def test_desc_chain_reports_a_walker_that_rejects_what_the_spec_allows(monkeypatch):
    fuzz_desc_chain.prepare()
    monkeypatch.setattr(fuzz_desc_chain, "reference", lambda size, head: [])
    assert "the reference walks" in str(fails(fuzz_desc_chain.one_input, seeds("desc_chain")))


def test_fuse_decode_reports_the_catch_all_and_bad_replies(monkeypatch, server_log):
    monkeypatch.setattr(server, "_cstr", lambda body, start: {}["no such key"])
    assert "KeyError" in str(fails(fuzz_fuse_decode.one_input, seeds("fuse_decode")))
    monkeypatch.undo()
    monkeypatch.setattr(server.FuseServer, "_reply", lambda self, wr, unique, body: 16)
    assert isinstance(fails(fuzz_fuse_decode.one_input, seeds("fuse_decode")), Broken)


def test_fuse_passthrough_reports_changes_outside_the_export():
    script = (
        "from tests.fuzz import fuzz_fuse_passthrough as t\n"
        "t.prepare()\n"
        "t._s.runs = t._WIPE_EVERY - 1\n"
        "(t._s.outside / 'planted').write_text('x')\n"
        "t.one_input(open(__import__('sys').argv[1], 'rb').read())\n")
    seed = sorted((CORPUS / "fuse_passthrough").glob("seed-*"))[0]
    proc = subprocess.run([sys.executable, "-c", script, str(seed)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=60)
    assert "a directory next to the export changed" in proc.stderr


def test_xattrmap_reports_a_broken_round_trip(monkeypatch):
    monkeypatch.setattr(XattrMap, "to_guest", lambda self, name: name)
    assert "-> host" in str(fails(fuzz_xattrmap.one_input, seeds("xattrmap")))


def test_idmap_reports_ids_out_of_range(monkeypatch):
    monkeypatch.setattr(idmap._Ranges, "lookup", lambda self, ident: ident + (1 << 32))
    assert isinstance(fails(fuzz_idmap.one_input, seeds("idmap")), Broken)


def test_config_yaml_lets_unexpected_exceptions_through(monkeypatch):
    def broken(key, value, where=""):  # type: ignore[no-untyped-def]
        raise TypeError("planted")

    monkeypatch.setattr(fuzz_config_yaml, "check_value", broken)
    fuzz_config_yaml.prepare()
    data = bytes([0, SETTINGS.index(next(s for s in SETTINGS if s.key == "workers"))]) + b"1"
    assert isinstance(fails(fuzz_config_yaml.one_input, [data]), TypeError)
