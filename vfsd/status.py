"""`vfsd status`: a control socket that answers one JSON snapshot per connection.

The supervisor listens on `<socket-path>.status` (or `/run/vfsd-<pid>.status` with --fd);
every connection gets the current state — workers with pid, load and requests served, the
in-flight requests with opcode, nodeid and age (to find hangs), and counters — then is closed.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson

from vfsd.fuse.abi import Opcode

MAX_INFLIGHT_LISTED = 200


def status_path(socket_path: str | None, pid: int) -> str:
    return f"{socket_path}.status" if socket_path else f"/run/vfsd-{pid}.status"


def op_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return str(opcode)


def inflight_rows(inflight: dict[int, tuple[int, int, int, int]], worker: int,
                  now_ns: int) -> list[dict[str, Any]]:
    """(queue << 16 | head) -> (opcode, nodeid, unique, start ns) as oldest-first rows."""
    rows = [{"worker": worker, "queue": key >> 16, "head": key & 0xFFFF, "op": op_name(op),
             "nodeid": nodeid, "unique": unique, "age_s": round((now_ns - start) / 1e9, 6)}
            for key, (op, nodeid, unique, start) in inflight.items()]
    rows.sort(key=lambda r: -r["age_s"])
    return rows


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Client side: connect, read the snapshot until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return orjson.loads(b"".join(chunks))


def render(snapshot: dict[str, Any]) -> str:
    """Human-readable form of a snapshot for the terminal."""
    lines = [
        f"vfsd {snapshot['version']}  pid {snapshot['pid']}  up {snapshot['uptime_s']:.0f} s  "
        f"export {snapshot['export']}",
        f"session: {'FUSE 7.' + str(snapshot['fuse_minor']) if snapshot['fuse_minor'] else 'none'}"
        f"  inodes {snapshot['inodes']}  front-end {'connected' if snapshot['connected'] else '-'}",
        "",
        f"{'worker':>6} {'pid':>8} {'inflight':>8} {'served':>10} {'restarts':>8} {'heartbeat':>9}",
    ]
    for w in snapshot["workers"]:
        beat = "-" if w["heartbeat_age_s"] is None else f"{w['heartbeat_age_s']:.1f}s"
        lines.append(f"{w['index']:>6} {w['pid'] or '-':>8} {w['inflight']:>8} {w['served']:>10}"
                     f" {w['restarts']:>8} {beat:>9}")
    inflight = snapshot["inflight"]
    lines.append("")
    lines.append(f"in flight: {snapshot['inflight_total']}")
    for r in inflight:
        lines.append(f"  {r['age_s']:9.3f}s  w{r['worker']} q{r['queue']} {r['op']:<14} "
                     f"nodeid={r['nodeid']} unique={r['unique']}")
    return "\n".join(lines)


def now_ns() -> int:
    return time.monotonic_ns()
