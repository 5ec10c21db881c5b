"""sd_notify over a fake $NOTIFY_SOCKET, and --print-capabilities."""

from __future__ import annotations

import io
import json
import os
import socket

import pytest

from vfsd import capabilities, sdnotify


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def test_ready_reaches_the_socket(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready("serving /srv on /run/vfsd.sock")
    got = fields(sock.recv(4096))
    assert got == {"READY": "1", "STATUS": "serving /srv on /run/vfsd.sock",
                   "MAINPID": str(os.getpid())}


def test_reload_stop_status_watchdog(notify_socket):
    path, sock = notify_socket
    env = {"NOTIFY_SOCKET": path}
    assert sdnotify.reloading(env=env)
    got = fields(sock.recv(4096))
    assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
    assert sdnotify.stopping(env=env)
    assert fields(sock.recv(4096)) == {"STOPPING": "1"}
    assert sdnotify.status("two\nlines", env=env)
    assert fields(sock.recv(4096)) == {"STATUS": "two lines"}
    assert sdnotify.watchdog(env=env)
    assert fields(sock.recv(4096)) == {"WATCHDOG": "1"}


def test_abstract_namespace_socket():
    name = f"vfsd-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert sdnotify.notify("READY=1\n", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"READY=1\n"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_no_socket_is_a_quiet_no_op(env):
    assert sdnotify.ready(env=env) is False


def test_unreachable_socket_returns_false(tmp_path):
    assert sdnotify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_print_capabilities_json():
    out = io.StringIO()
    assert capabilities.print_capabilities(out) == 0
    caps = json.loads(out.getvalue())
    assert caps == {"type": "fs", "features": ["separate-options"]}
    # No migration support: libvirt must not be told otherwise.
    assert "migrate-precopy" not in caps["features"]
