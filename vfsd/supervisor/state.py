"""The state the supervisor's parts share (one object: `arbiter.Supervisor`).

Each concern of the supervisor is a module with one mixin class (routing, completion,
hiprio, session, device, recovery, operations); they all work on this state, which
`Supervisor.__init__` fills in. Declared here so every part is type-checked against it.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

from vfsd.config import Settings
from vfsd.dispatch.used import UsedLock, UsedRing
from vfsd.fs.inode_table import InodeTable
from vfsd.fuse.options import FsOptions
from vfsd.metrics.http import MetricsServer
from vfsd.metrics.slab import MetricsBook
from vfsd.pool import WorkerPool, WorkerSlot
from vfsd.transport.backend import VhostUserBackend
from vfsd.transport.memory import GuestMemory
from vfsd.transport.virtqueue import Vring


class SupervisorState:
    settings: Settings
    _reload: Callable[[], Settings] | None  # re-reads the YAML file, re-applies the CLI
    options: FsOptions
    listener: socket.socket | None  # until the front-end connects
    conn: socket.socket | None  # the vhost-user connection
    epoll: select.epoll
    rr: int  # round-robin start for ties between equally loaded workers
    _replayed: set[int]  # uniques replayed after a worker death
    completion_doorbell: int
    table: InodeTable | None
    pool: WorkerPool | None
    backend: VhostUserBackend | None
    mem: GuestMemory | None
    kick_fds: dict[int, Vring]  # kick fd -> ring
    used_locks: dict[int, UsedLock]  # request queue -> the used-ring state workers share
    used: dict[int, UsedRing]  # request queue -> the supervisor's writer of its used ring
    sentinels: dict[int, WorkerSlot]
    session: dict | None  # the negotiated FUSE session, as sent to workers
    book: MetricsBook | None
    metrics_server: MetricsServer | None
    status_listener: socket.socket | None
    status_path: str
    started: float
    running: bool
    exit_code: int
    _signal_r: socket.socket
    _signal_w: socket.socket
