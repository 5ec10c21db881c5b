"""CPU time of a daemon and all its descendants, read from /proc.

Why: "who is the bottleneck" needs the daemon's CPU per op split by process (vfsd: the
supervisor and each worker; virtiofsd: its sandboxed child and all its threads). Per-thread
`/proc/PID/task/TID/schedstat` gives nanoseconds of run time (tick-free, so a 0.3 s run is
still measurable); `/proc/PID/stat` utime+stime (clock ticks) is the fallback.
Descendants are found by walking /proc for parent pids (`task/*/children` needs
CONFIG_PROC_CHILDREN, which not every kernel has).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcCpu:
    """One process's CPU time so far: run time of all its threads."""

    pid: int
    ppid: int
    comm: str
    cpu_ns: int


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> tuple[str, list[str]] | None:
    """(comm, fields after comm) of /proc/PID/stat; comm may contain spaces and parens."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    lpar, rpar = text.find("("), text.rfind(")")
    return text[lpar + 1 : rpar], text[rpar + 2 :].split()


def process_cpu(pid: int) -> ProcCpu | None:
    """CPU time of `pid` (all threads), or None if it is gone."""
    parsed = _stat_fields(pid)
    if parsed is None:
        return None
    comm, fields = parsed
    ppid = int(fields[1])
    total = 0
    found = False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/schedstat")
        if text:
            total += int(text.split()[0])
            found = True
    if not found or total == 0:
        # No schedstat: utime + stime in clock ticks (coarse, but always there).
        total = (int(fields[11]) + int(fields[12])) * _TICK_NS
    return ProcCpu(pid, ppid, comm, total)


def descendants(root: int) -> list[int]:
    """`root` and every live descendant, parents before children."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        parsed = _stat_fields(int(name))
        if parsed is not None:
            children.setdefault(int(parsed[1][1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, ())))
    return out


def role(root: int, proc: ProcCpu) -> str:
    """A readable name: vfsd's root process is the supervisor, its children workers."""
    if proc.pid == root:
        return "supervisor" if proc.comm.startswith("python") or proc.comm == "vfsd" else \
            proc.comm
    if proc.ppid == root and (proc.comm.startswith("python") or proc.comm == "vfsd"):
        return "worker"
    return proc.comm


class CpuSampler:
    """Snapshots of a daemon tree; `delta` gives CPU seconds per process between two."""

    def __init__(self, root: int) -> None:
        self.root = root

    def snapshot(self) -> dict[int, ProcCpu]:
        snap: dict[int, ProcCpu] = {}
        for pid in descendants(self.root):
            proc = process_cpu(pid)
            if proc is not None:
                snap[pid] = proc
        return snap

    def delta(self, before: dict[int, ProcCpu], after: dict[int, ProcCpu]
              ) -> list[tuple[str, int, float]]:
        """[(role, pid, cpu seconds)] for every process seen in `after` (new ones count from
        0); a process that exited in between is lost (rare: the daemon keeps its workers)."""
        out = []
        for pid, proc in after.items():
            start = before.get(pid)
            used = proc.cpu_ns - (start.cpu_ns if start is not None else 0)
            out.append((role(self.root, proc), pid, max(used, 0) / 1e9))
        return out


# Deleted by design: memfds (guest RAM, lock files) and unlinked shared-memory segments.
_NOT_ORPHANS = ("/memfd:", "/dev/shm/")


def deleted_fds(pids: list[int]) -> int:
    """How many open fds of `pids` name deleted files: each keeps its inode (and blocks) on
    the host, and on ext4 every such orphan makes later creates slower."""
    count = 0
    for pid in pids:
        base = f"/proc/{pid}/fd"
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"{base}/{name}")
            except OSError:
                continue
            if target.endswith(" (deleted)") and not target.startswith(_NOT_ORPHANS):
                count += 1
    return count


class OrphanWatch:
    """Samples `deleted_fds` of a daemon tree every `interval` s while a run goes on; `peak`
    is the largest count seen. Its own CPU time is kept apart (`cpu_s`), so the caller can
    leave it out of the load generator's."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orphan-watch", daemon=True)

    def _run(self) -> None:
        t0 = time.thread_time()
        pids = descendants(self.root)
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, deleted_fds(pids))
            self.samples += 1
        self.cpu_s = time.thread_time() - t0

    def __enter__(self) -> OrphanWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
