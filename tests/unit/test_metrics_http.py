"""The /metrics endpoint: start, scrape, 404s, stop, address parsing."""

from __future__ import annotations

import gzip
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.metrics.fakes import FakeSource, write_workload
from vfsd.metrics.collector import make_registry
from vfsd.metrics.http import DEFAULT_LISTEN, MetricsServer, parse_listen
from vfsd.metrics.slab import MetricsBook, WorkerMetrics


@pytest.fixture
def registry():
    book = MetricsBook(1)
    write_workload(WorkerMetrics(book.renew(0)), 1)
    yield make_registry(book, FakeSource(1))
    book.close()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:9720", ("127.0.0.1", 9720)),
    ("[::1]:9721", ("::1", 9721)),
    (":9722", ("", 9722)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_listen(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("bad", ["9720", "host:", "host:port", "::1:9720", "1.2.3.4:70000"])
def test_parse_listen_rejects(bad):
    with pytest.raises(ValueError):
        parse_listen(bad)


def test_default_listen_is_loopback_9720():
    assert parse_listen(DEFAULT_LISTEN) == ("127.0.0.1", 9720)


def test_serves_metrics_and_stops(registry):
    server = MetricsServer(registry, "127.0.0.1:0")
    host, port = server.start()
    try:
        assert host == "127.0.0.1" and port > 0 and server.running
        assert server.fileno() is not None
        status, headers, body = get(server.url)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"vfsd_requests", "vfsd_build_info"} <= names
        status, headers, body = get(server.url, {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip"
        assert b"vfsd_requests_total" in gzip.decompress(body)
        assert get(f"http://127.0.0.1:{port}/")[0] == 200
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
        assert server.start() == (host, port)  # idempotent
    finally:
        server.stop()
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    server.stop()  # idempotent


def test_start_again_after_stop(registry):
    server = MetricsServer(registry, "127.0.0.1:0")
    server.start()
    server.stop()
    server.start()
    try:
        assert get(server.url)[0] == 200
    finally:
        server.stop()


def test_port_in_use_raises_in_caller(registry):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = MetricsServer(registry, f"127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(OSError):
            server.start()
        assert not server.running


def test_ipv6_loopback(registry):
    try:
        socket.socket(socket.AF_INET6).close()
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = MetricsServer(registry, "[::1]:0")
    server.start()
    try:
        assert server.url.startswith("http://[::1]:")
        assert get(server.url)[0] == 200
    finally:
        server.stop()
