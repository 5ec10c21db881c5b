"""The vhost-user connection and the `VirtioFsDevice` callbacks of the back-end: memory table
and ring layouts forwarded to the workers."""

from __future__ import annotations

import logging
import os
import select

from vfsd.dispatch import control
from vfsd.pool import WorkerSlot
from vfsd.supervisor.state import SupervisorState
from vfsd.supervisor.wire import EDGE, HIPRIO
from vfsd.transport import FramingError, GuestProtocolError
from vfsd.transport.backend import VhostUserBackend
from vfsd.transport.codec import decode
from vfsd.transport.connection import PeerClosed, recv_frame, send_message
from vfsd.transport.memory import GuestMemory
from vfsd.transport.virtqueue import Vring

log = logging.getLogger("vfsd.supervisor")


class Device(SupervisorState):
    def accept(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        self.epoll.unregister(self.listener.fileno())
        self.listener.close()
        self.listener = None
        if self.settings.socket_path:
            try:
                os.unlink(self.settings.socket_path)
            except FileNotFoundError:
                pass
        self.conn = conn
        self.backend = VhostUserBackend(self, num_queues=1 + self.settings.num_queues)
        self.epoll.register(conn.fileno(), select.EPOLLIN)
        log.info("front-end connected")

    def handle_vhost_message(self) -> None:
        assert self.conn is not None and self.backend is not None
        try:
            header, payload, fds = recv_frame(self.conn)
            message = decode(header, payload, fds)
        except PeerClosed:
            log.info("front-end disconnected; exiting")
            self.running = False
            return
        except FramingError as e:  # the stream is out of sync: nothing more can be read
            log.error("vhost-user stream broken, dropping the connection: %s", e)
            self.running = False
            self.exit_code = 1
            return
        except GuestProtocolError as e:  # payload undecodable; the stream is still in sync
            reply = self.backend.reject(header, str(e))
        else:
            reply = self.backend.handle(message)
        if reply is not None:
            send_message(self.conn, reply)

    # VirtioFsDevice protocol (called by the backend)
    def memory_changed(self, mem: GuestMemory) -> None:
        self.mem = mem
        for slot in self.pool.live() if self.pool else ():
            self._send_memory(slot)

    def _send_memory(self, slot: WorkerSlot) -> None:
        assert self.mem is not None
        regions = self.mem.regions()
        slot.channel.send({"kind": control.MEMORY,
                           "regions": [[r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                        r.mmap_offset] for r, _fd in regions]},
                          [fd for _r, fd in regions])

    def _send_vring(self, slot: WorkerSlot, vring: Vring) -> None:
        slot.channel.send({"kind": control.VRING, "queue": vring.index,
                           "desc_gpa": vring.desc_gpa, "size": vring.size})

    def queue_started(self, vring: Vring) -> None:
        if vring.kick_fd is not None and vring.kick_fd not in self.kick_fds:
            self.kick_fds[vring.kick_fd] = vring
            self.epoll.register(vring.kick_fd, EDGE)
        if vring.index != HIPRIO and self.pool is not None:
            for slot in self.pool.live():
                self._send_vring(slot, vring)

    def queue_enabled(self, vring: Vring, enabled: bool) -> None:
        if enabled and vring.started:
            self.process_queue(vring)

    def queue_stopping(self, vring: Vring) -> None:
        """GET_VRING_BASE: complete every in-flight request of this ring before the reply."""
        self.quiesce(lambda key: key >> 16 == vring.index)
        for fd, ring in list(self.kick_fds.items()):
            if ring is vring:
                self.epoll.unregister(fd)
                del self.kick_fds[fd]

    def kick_fd_changed(self, vring: Vring, old_fd: int | None) -> None:
        if old_fd is not None and old_fd in self.kick_fds:
            self.epoll.unregister(old_fd)
            del self.kick_fds[old_fd]

    def call_fd_changed(self, vring: Vring) -> None:
        """The ring object keeps the newest call fd; nothing else holds it."""


    def _resync(self, slot: WorkerSlot) -> None:
        """Give a respawned worker the memory table, ring layouts and FUSE session."""
        if self.mem is not None:
            self._send_memory(slot)
        if self.backend is not None:
            for vring in self.backend.vrings[1:]:
                if vring.started:
                    self._send_vring(slot, vring)
        if self.session is not None:
            slot.channel.send({"kind": control.SESSION, "session": self.session})

