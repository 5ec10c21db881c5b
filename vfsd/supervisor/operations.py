"""What operators reach: metrics state, `vfsd status`, signals and SIGHUP reload."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import orjson

from vfsd import __version__, sdnotify, status
from vfsd.config import BY_KEY, ConfigError, Settings
from vfsd.dispatch import control
from vfsd.dispatch.channel import CB_HEARTBEAT_NS, CB_SERVED
from vfsd.logs import set_level as set_log_level
from vfsd.metrics.collector import DaemonState, WorkerState, make_registry
from vfsd.metrics.http import MetricsServer
from vfsd.supervisor.state import SupervisorState

log = logging.getLogger("vfsd.supervisor")


class Operations(SupervisorState):
    def metrics_state(self) -> DaemonState:
        assert self.pool is not None and self.table is not None
        now = time.monotonic_ns()
        workers = []
        inflight = 0
        for slot in self.pool.slots:
            process = slot.process
            beat = slot.channel.block[CB_HEARTBEAT_NS]
            # Records not read yet are requests already answered.
            inflight += len(slot.inflight) - len(slot.channel.completions)
            workers.append(WorkerState(
                slot.index, process.pid if process is not None else None,
                len(slot.channel.requests), (now - beat) / 1e9 if beat else None))
        mem = self.mem
        memory = sum(r.memory_size for r, _fd in mem.regions()) if mem is not None else 0
        return DaemonState(workers, inflight, self.table.count(), memory)

    # vfsd status
    def snapshot(self) -> dict:
        assert self.pool is not None and self.table is not None
        now = time.monotonic_ns()
        workers, inflight = [], []
        for slot in self.pool.slots:
            beat = slot.channel.block[CB_HEARTBEAT_NS]
            # A request whose pending word is clear was returned to the guest already; its
            # completion record is on its way.
            mine = slot.index + 1
            running = {key: entry for key, entry in slot.inflight.items()
                       if self.used_locks[key >> 16].pending[key & 0xFFFF] == mine}
            workers.append({
                "index": slot.index, "pid": slot.pid, "inflight": len(running),
                "served": slot.channel.block[CB_SERVED], "restarts": slot.incarnation - 1,
                "heartbeat_age_s": round((now - beat) / 1e9, 3) if beat else None})
            inflight += status.inflight_rows(running, slot.index, now)
        inflight.sort(key=lambda r: -r["age_s"])
        return {
            "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "export": self.settings.shared_dir, "connected": self.conn is not None,
            "fuse_minor": self.session["minor"] if self.session else None,
            "inodes": self.table.count(), "workers": workers,
            "inflight_total": len(inflight), "inflight": inflight[: status.MAX_INFLIGHT_LISTED],
        }

    def serve_status(self) -> None:
        assert self.status_listener is not None
        try:
            conn, _ = self.status_listener.accept()
        except BlockingIOError:
            return
        self.drain_completions()  # in-flight rows are then at most a moment old
        with conn:
            conn.settimeout(1.0)
            try:
                conn.sendall(orjson.dumps(self.snapshot()))
            except OSError as e:
                log.debug("status client went away: %s", e)

    # signals and shutdown
    def handle_signals(self) -> None:
        try:
            data = self._signal_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s; stopping", signal.Signals(signum).name)
                self.running = False
            elif signum == signal.SIGHUP:
                self.reload_config()

    def reload_config(self) -> None:
        """SIGHUP: apply what can change live, log what needs a restart; the guest never
        notices (no ring, session or handle is touched)."""
        if self._reload is None:
            log.warning("SIGHUP: no configuration file to reload (start vfsd with --config "
                        "FILE to change settings live)")
            return
        sdnotify.reloading()
        try:
            new = self._reload()
        except ConfigError as e:
            log.error("reload failed, the running configuration stays: %s", e)
            sdnotify.ready()
            return
        old = self.settings
        changed = [k for k in BY_KEY if getattr(old, k) != getattr(new, k)]
        applied: dict[str, Any] = {}
        for key in changed:
            value = getattr(new, key)
            if key == "log_level":  # set after the summary below, so it is always logged
                for slot in self.pool.live() if self.pool else ():
                    slot.channel.send({"kind": control.LOG_LEVEL, "level": value})
            elif key == "cache":  # timeouts of new entries, FOPEN flags of new opens
                self.options = dataclasses.replace(self.options, cache=value)
                if self.pool is not None:
                    self.pool.options = self.options  # respawned workers too
                for slot in self.pool.live() if self.pool else ():
                    slot.channel.send({"kind": control.CACHE, "cache": value})
            elif key in ("metrics", "metrics_listen"):
                continue  # applied together below
            elif key == "workers" and self._grow_pool(new.worker_count):
                pass
            else:
                continue
            applied[key] = value
        if {"metrics", "metrics_listen"} & set(changed) and self._restart_metrics(new):
            applied.update({k: getattr(new, k) for k in ("metrics", "metrics_listen")
                            if k in changed})
        self.settings = old.replace(**applied)
        restart = [k for k in changed if k not in applied]
        log.info("configuration reloaded", extra={"fields": {
            "applied": ",".join(f"{k}={v}" for k, v in applied.items()) or "-",
            "needs_restart": ",".join(restart) or "-"}})
        set_log_level(self.settings.log_level)
        sdnotify.ready()

    def _grow_pool(self, count: int) -> bool:
        """More workers take effect at once; fewer would strand the fhs the extra workers own,
        so shrinking waits for a restart."""
        assert self.pool is not None
        if count <= len(self.pool.slots):
            return False
        for slot in self.pool.grow(count):
            self._watch(slot)
            self._resync(slot)
        return True

    def _restart_metrics(self, new: Settings) -> bool:
        assert self.pool is not None
        if self.pool.record_metrics != new.metrics:
            self.pool.record_metrics = new.metrics
            for slot in self.pool.live():
                slot.channel.send({"kind": control.METRICS, "on": new.metrics})
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if not new.metrics:
            return True
        assert self.book is not None
        server = MetricsServer(make_registry(self.book, self), new.metrics_listen)
        try:
            server.start()
        except OSError as e:
            log.error("cannot serve metrics on %s: %s", new.metrics_listen, e.strerror)
            return False
        self.metrics_server = server
        log.info("metrics at %s", server.url)
        return True

