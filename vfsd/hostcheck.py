"""Settings that depend on the host: checked as warnings by `vfsd check-config` (a file may
be checked on another host than the one that runs it) and as errors at start-up."""

from __future__ import annotations

import grp
import os

from vfsd.affinity import parse_cpulist, usable
from vfsd.config import Settings

_NR_OPEN = "/proc/sys/fs/nr_open"


def problems(settings: Settings) -> list[tuple[str, str]]:
    """(key, reason) for each setting this host cannot honour."""
    out = []
    shared = settings.shared_dir
    if shared is not None and not os.path.isdir(shared):
        out.append(("shared_dir", f"{shared} is not a directory" if os.path.exists(shared)
                    else f"{shared} does not exist"))
    for key in ("supervisor_cpus", "worker_cpus"):
        if (text := getattr(settings, key)) is not None:
            try:
                usable(parse_cpulist(text))
            except ValueError as e:
                out.append((key, str(e)))
    group = settings.socket_group
    if group is not None and not group.isdigit():
        try:
            grp.getgrnam(group)
        except KeyError:
            out.append(("socket_group", f"no group {group!r}"))
    if settings.rlimit_nofile is not None and settings.rlimit_nofile > (limit := _nr_open()):
        out.append(("rlimit_nofile", f"above this host's fs.nr_open ({limit})"))
    return out


def _nr_open() -> int:
    try:
        with open(_NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default

