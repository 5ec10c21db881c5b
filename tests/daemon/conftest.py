"""A real vfsd process driven over its socket by the project's vhost-user front-end."""

from __future__ import annotations

import pytest

from tests.daemon_proc import Daemon
from tests.unit.fusereq import FuseClient
from vfsd.frontend.vhost_client import VhostUserClient

REQUEST_QUEUE = 1


class VhostServer:
    """Adapts the front-end to `FuseClient`'s `server.handle(readable, writable)` interface:
    each call is one chain on the request queue, answered by the daemon through guest memory."""

    def __init__(self, client: VhostUserClient, queue: int = REQUEST_QUEUE) -> None:
        self.client = client
        self.queue = queue

    def handle(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        self.client.submit(self.queue, [bytes(v) for v in readable], [len(v) for v in writable])
        done = self.client.wait(self.queue, timeout=10)
        assert len(done) == 1, "the daemon did not complete the request in 10 s"
        data = done[0].data
        pos = 0
        for view in writable:
            n = min(len(view), len(data) - pos)
            view[:n] = data[pos : pos + n]
            pos += n
        return done[0].used_len


class Session:
    def __init__(self, daemon: Daemon, client: VhostUserClient) -> None:
        self.daemon = daemon
        self.client = client
        self.fuse = FuseClient(VhostServer(client))


def connect(daemon: Daemon, **kwargs) -> VhostUserClient:
    client = VhostUserClient.connect(daemon.socket_path, **kwargs)
    client.realize()
    client.start()
    return client


@pytest.fixture(params=[1, 4], ids=lambda n: f"workers{n}")
def session(request, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    daemon = Daemon(tmp_path, export, workers=request.param)
    client = None
    try:
        client = connect(daemon, num_queues=2)
        s = Session(daemon, client)
        reply = s.fuse.init()
        assert reply.error == 0, reply
        yield s
    finally:
        if client is not None:
            client.close()
        daemon.stop()
