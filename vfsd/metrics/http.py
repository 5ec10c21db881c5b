"""The metrics HTTP endpoint: `GET /metrics` on `metrics_listen` (default 127.0.0.1:9720).

A small threaded WSGI server around prometheus-client's `make_wsgi_app` (text exposition,
gzip when asked, OpenMetrics on `Accept`), running in one daemon thread of the supervisor:

    server = MetricsServer(registry, "127.0.0.1:9720")
    host, port = server.start()      # binds (port 0 = any free port), starts the thread
    ...
    server.stop()                    # stops serving, closes the socket, joins the thread

`start()` raises `OSError` (e.g. EADDRINUSE) in the caller if the address cannot be bound.
Other paths answer 404; `/` answers a one-line pointer to `/metrics`.

Fork: the listening socket is inherited by every worker the supervisor forks afterwards;
workers must close it (`fileno()`), or a stopped server's port stays bound by them.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

DEFAULT_LISTEN = "127.0.0.1:9720"
DEFAULT_PATH = "/metrics"


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all addresses) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics listen address {listen!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"metrics listen address {listen!r}: write IPv6 hosts as [ADDR]:PORT")
    return host, int(port)


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """No per-request logging (a scrape every few seconds would flood the log)."""


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (getfqdn: a DNS query at start-up).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port
        self.setup_environ()


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, listen: str = DEFAULT_LISTEN,
                 path: str = DEFAULT_PATH) -> None:
        self.host, self.port = parse_listen(listen)
        self.path = path
        self._metrics_app = make_wsgi_app(registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == self.path:
            return self._metrics_app(environ, start_response)
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"vfsd: metrics at {self.path}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) - the real port when started with port 0."""
        assert self._server is not None, "not started"
        return self._server.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{self.path}"

    def fileno(self) -> int | None:
        return self._server.fileno() if self._server is not None else None

    def start(self) -> tuple[str, int]:
        if self._server is not None:
            return self.address
        host = self.host or "::"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if not self.host:  # ":PORT" - every address, v4 and v6 when the host has v6
            try:
                socket.socket(socket.AF_INET6).close()
            except OSError:
                host, family = "0.0.0.0", socket.AF_INET

        server_class = type("_FamilyServer", (_Server,), {"address_family": family})
        server = server_class((host, self.port), _Handler, bind_and_activate=False)
        try:
            if family == socket.AF_INET6 and not self.host:
                server.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            server.server_bind()
            server.server_activate()
        except OSError:
            server.server_close()
            raise
        server.set_app(self._app)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                  name="vfsd-metrics", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return self.address

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)
