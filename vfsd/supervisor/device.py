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
from vfsd.transport import FramingError, GuestMemoryError, GuestProtocolError
from vfsd.transport.backend import VhostUserBackend
from vfsd.transport.codec import decode
from vfsd.transport.connection import FdsTruncated, PeerClosed, recv_frame, send_message
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
        except FdsTruncated as e:  # refused; the stream is still in sync
            header = e.header
            reply = self.backend.reject(header, str(e))
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
            try:
                send_message(self.conn, reply)
            except OSError as e:  # hung up before reading its replies
                log.info("front-end went away (%s); exiting", e.strerror or e)
                self.running = False

    # VirtioFsDevice protocol (called by the backend)
    def memory_changed(self, mem: GuestMemory) -> None:
        self.mem = mem
        for slot in self.pool.live() if self.pool else ():
            self._send_memory(slot)
        if self.backend is not None:
            for vring in self.backend.vrings[HIPRIO + 1 :]:
                if vring.started:
                    self._map_used(vring)

    def _map_used(self, vring: Vring) -> None:
        """The supervisor's own view of a request queue's used ring (its replies)."""
        writer = self.used[vring.index]
        writer.unmap()
        if self.mem is None or not vring.mapped:
            return
        try:
            writer.map(self.mem, vring.size, vring.avail_gpa, vring.used_gpa, vring.event_idx)
        except GuestMemoryError:
            log.error("queue %d: used ring outside guest memory", vring.index)

    def _send_memory(self, slot: WorkerSlot) -> None:
        assert self.mem is not None
        regions = self.mem.regions()
        slot.channel.send({"kind": control.MEMORY,
                           "regions": [[r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                        r.mmap_offset] for r, _fd in regions]},
                          [fd for _r, fd in regions])

    def _send_vring(self, slot: WorkerSlot, vring: Vring) -> None:
        slot.channel.send({"kind": control.VRING, "queue": vring.index,
                           "desc_gpa": vring.desc_gpa, "avail_gpa": vring.avail_gpa,
                           "used_gpa": vring.used_gpa, "size": vring.size,
                           "event_idx": vring.event_idx},
                          [vring.call_fd] if vring.call_fd is not None else None)

    def queue_started(self, vring: Vring) -> None:
        if vring.kick_fd is not None and vring.kick_fd not in self.kick_fds:
            self.kick_fds[vring.kick_fd] = vring
            self.epoll.register(vring.kick_fd, EDGE)
        if vring.index != HIPRIO and self.pool is not None:
            # A new layout or base: the EVENT_IDX state starts over (as Vring's does).
            self.used_locks[vring.index].reset()
            self._map_used(vring)
            self._set_call_fd(vring)
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
        """SET_VRING_CALL, possibly while requests are in flight: every worker gets the new
        fd, then `call_gen` moves, so a worker re-reads its control channel before its next
        interrupt. A worker that signalled the old fd meanwhile is covered by one interrupt
        on the new fd from here (a spurious interrupt is harmless, a lost one hangs)."""
        if vring.index == HIPRIO or vring.index not in self.used or not vring.started:
            return  # a queue not started yet gets its call fd with its layout
        for slot in self.pool.live() if self.pool else ():
            slot.channel.send({"kind": control.CALL, "queue": vring.index},
                              [vring.call_fd] if vring.call_fd is not None else None)
        self.used_locks[vring.index].bump_call_gen()
        self._set_call_fd(vring)
        if vring.started:
            self.used[vring.index].signal()

    def _set_call_fd(self, vring: Vring) -> None:
        self.used[vring.index].set_call_fd(
            os.dup(vring.call_fd) if vring.call_fd is not None else None)


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

