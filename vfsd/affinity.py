"""CPU placement of the supervisor and the workers (`supervisor_cpus`, `worker_cpus`).

Why a daemon should care: every request crosses from the supervisor to a worker and back.
When the kernel's wake-up placement puts a worker on the CPU of the supervisor that woke
it, the two take turns on one CPU instead of running side by side. On a 2-vCPU host,
getattr at QD 16 with 1 worker ran at 50k ops/s with both on one CPU, 117k with the
worker on a CPU of its own, and 50-120k unpinned, depending on where the scheduler put
them (docs/PERFORMANCE.md). The default is to inherit the caller's affinity (systemd's
CPUAffinity=, taskset).
"""

from __future__ import annotations

import os
from itertools import groupby

MAX_CPU = 8191  # a sanity bound for a cpulist (Linux's NR_CPUS is at most 8192)


def parse_cpulist(text: str) -> frozenset[int]:
    """The CPUs of a Linux cpulist ("0", "1-3", "0,2-3"), as taskset -c and cpuset take them.
    Raises ValueError naming the part that is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"{part!r} is not a CPU number or range") from None
        if not 0 <= low <= high <= MAX_CPU:
            raise ValueError(f"{part!r} is not a range of CPU numbers 0-{MAX_CPU}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def usable(cpus: frozenset[int]) -> frozenset[int]:
    """The CPUs of `cpus` this process may run on; raises ValueError if some are not."""
    allowed = os.sched_getaffinity(0)
    if missing := cpus - allowed:
        raise ValueError(f"CPU(s) {format_cpulist(missing)} not available (allowed: "
                         f"{format_cpulist(frozenset(allowed))})")
    return cpus


def format_cpulist(cpus: frozenset[int]) -> str:
    """The shortest cpulist for `cpus` ("0-3,6")."""
    out = []
    # Consecutive CPUs share cpu - position: each group is one run.
    for _, group in groupby(enumerate(sorted(cpus)), lambda pair: pair[1] - pair[0]):
        run = [cpu for _, cpu in group]
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def cpu_budget(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """How many CPUs this process may use: its affinity (which a cgroup cpuset narrows),
    capped by a cgroup v2 CPU quota (`cpu.max`, e.g. systemd's CPUQuota=) rounded up.
    Not os.cpu_count(): one vfsd runs per VM, and each must size itself to its own share."""
    n = len(os.sched_getaffinity(0))
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.split(":", 2)[2].strip() for line in f
                         if line.startswith("0::")), None)
        if path is None:
            return n
        with open(os.path.join(cgroup_root, path.lstrip("/"), "cpu.max")) as f:
            quota, period = f.read().split()
    except (OSError, ValueError):
        return n
    if quota == "max":
        return n
    return max(1, min(n, -(-int(quota) // int(period))))
