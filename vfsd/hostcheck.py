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


def device_node_risk(settings: Settings) -> str | None:
    """Why allowing device nodes is risky on this export, or None.

    vfsd never opens a device node, but any host process that opens one the guest made
    reaches the host device, unless the export's mount is nodev."""
    if settings.allow_devices != "all" or not settings.shared_dir:
        return None
    try:
        if os.statvfs(settings.shared_dir).f_flag & os.ST_NODEV:
            return None
    except OSError:
        return None
    return (f"the guest may create device nodes (allow_devices: all) and {settings.shared_dir}"
            " is not on a nodev mount: a host process that opens a node the guest made "
            "reaches the host device. Mount the export nodev, or set allow_devices: "
            "whiteouts (overlayfs only) or none")
