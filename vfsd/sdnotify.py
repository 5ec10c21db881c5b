"""systemd's readiness protocol (sd_notify(3)) in a few lines of socket code, no dependency.

With `Type=notify` systemd sets `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
namespace) and waits for `READY=1` before it considers the unit started. Without the variable
(not under systemd) every call is a no-op returning False.

    sdnotify.ready("serving /srv/export on /run/vfsd/vm1/vfsd.sock")   # once listening
    sdnotify.reloading() ... sdnotify.ready()                           # around a SIGHUP reload
    sdnotify.stopping()                                                 # on SIGTERM
    sdnotify.status("2 workers, 1 restart")                             # free text

Only the main process may notify (the unit's default `NotifyAccess=main`): call it from the
supervisor, never from a worker. Workers inherit `$NOTIFY_SOCKET`; that is harmless.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):  # abstract namespace
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    return None  # unset, or a kind we do not speak (vsock:...)


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send one datagram of `KEY=VALUE` lines; True if it was sent. Errors are returned as
    False, never raised: readiness reporting must not take the daemon down."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def _lines(*lines: str | None) -> str:
    return "\n".join(line.replace("\n", " ") for line in lines if line) + "\n"


def ready(status: str | None = None, **kw) -> bool:
    """The service is up (the vhost-user socket listens)."""
    return notify(_lines("READY=1", f"STATUS={status}" if status else None,
                         f"MAINPID={os.getpid()}"), **kw)


def reloading(**kw) -> bool:
    """A configuration reload started; send `ready()` when it is done."""
    return notify(_lines("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}"), **kw)


def stopping(**kw) -> bool:
    return notify(_lines("STOPPING=1"), **kw)


def status(text: str, **kw) -> bool:
    return notify(_lines(f"STATUS={text}"), **kw)


def watchdog(**kw) -> bool:
    """Keep-alive for `WatchdogSec=` (not used by the shipped unit)."""
    return notify(_lines("WATCHDOG=1"), **kw)
