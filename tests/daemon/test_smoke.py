"""First contact: the daemon answers INIT and basic ops over vhost-user."""

import os

from tests.unit.fusereq import attr, entry


def test_getattr_root_and_lookup(session):
    (session.daemon.export / "a.txt").write_text("x")
    reply = session.fuse.getattr(1)
    assert reply.error == 0
    assert attr(reply)[0] == os.stat(session.daemon.export).st_ino
    reply = session.fuse.lookup(1, b"a.txt")
    assert reply.error == 0
    nodeid, _ = entry(reply)
    assert nodeid > 1
