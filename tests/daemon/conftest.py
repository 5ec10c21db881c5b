"""A real vfsd process driven over its socket by the project's vhost-user front-end."""

from __future__ import annotations

import pytest

from tests.daemon_proc import Daemon
from vfsd.frontend.fuse_client import FuseClient, VhostTransport
from vfsd.frontend.vhost_client import VhostUserClient


class Session:
    def __init__(self, daemon: Daemon, client: VhostUserClient) -> None:
        self.daemon = daemon
        self.client = client
        self.fuse = FuseClient(VhostTransport(client))


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
