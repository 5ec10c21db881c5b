"""Start-up helpers: the vhost-user listener, the status socket, limits.

Each raises `StartupError`, which the CLI prints as one line with a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import resource
import socket

from vfsd.config import Settings

log = logging.getLogger("vfsd.supervisor")


class StartupError(Exception):
    """A start-up problem reported as one line with a non-zero exit code."""



def listen_status(path: str) -> socket.socket:
    """The `vfsd status` socket; a stale file from a dead vfsd is replaced."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot create status socket {path}: {e.strerror}") from e
    os.chmod(path, 0o600)
    sock.listen(8)
    sock.setblocking(False)
    return sock


def group_id(group: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"--socket-group {group}: no such group") from None


def set_nofile_limit(limit: int) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (ValueError, OSError) as e:
        raise StartupError(f"--rlimit-nofile {limit}: {e}") from e


def listen(settings: Settings) -> socket.socket:
    if settings.socket_fd is not None:
        sock = socket.socket(fileno=settings.socket_fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise StartupError(f"--fd {settings.socket_fd} is not a Unix stream socket")
        return sock
    path = settings.socket_path
    if not path:
        raise StartupError("no vhost-user socket: give --socket-path PATH or --fd FD")
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket file from a previous run
        else:
            raise StartupError(f"socket path {path} is in use by another process")
        finally:
            probe.close()
    # Bind under a temporary name and rename once listening: whoever waits for the socket
    # file to appear (QEMU's launcher, a test) must never find it refusing connections.
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        if settings.socket_group:
            os.chown(tmp, -1, group_id(settings.socket_group))
            os.chmod(tmp, 0o660)
        sock.listen(1)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise StartupError(f"cannot listen on {path}: {e.strerror}") from e
    return sock

