"""`vfsd bench`: drive any virtio-fs back-end socket with FUSE traffic and report the cost.

    vfsd bench --spawn vfsd:1 vfsd:2 virtiofsd:0 --workload all --queue-depth 1 16
    vfsd bench --socket /run/vfsd.sock --pid $(pidof -s vfsd) --workload getattr --json

A spawned daemon serves a fresh temporary export; with --socket, the bench writes under
`/vfsd-bench/` of that export and the back-end usually exits when the bench disconnects.
Exit status: 0, or 1 if any reply was wrong (errors are counted and shown, never hidden).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import Any

from vfsd.bench.daemons import DaemonSpec, find_virtiofsd
from vfsd.bench.engine import BenchError
from vfsd.bench.report import errors_text, orphans_text, table, to_json
from vfsd.bench.runner import BenchSession, Result, run_matrix, run_spawned, session_meta
from vfsd.bench.workloads import WORKLOADS, MiB, Options


def _size(text: str) -> int:
    """`4096`, `64M`, `1G`, `512k`."""
    text = text.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfsd bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads: " + ", ".join(WORKLOADS) + "\n\n" + __doc__.split("\n\n", 1)[1])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--socket", metavar="PATH", help="an already listening back-end")
    target.add_argument("--spawn", metavar="DAEMON[:N]", nargs="+",
                        help="start vfsd or virtiofsd (N = workers / thread pool size) on a "
                             "temporary export; several run one after the other")
    p.add_argument("--pid", type=int, help="back-end pid for CPU accounting with --socket "
                                           "(its children and threads are included)")
    p.add_argument("--label", default=None, help="name of the --socket back-end in the table")
    p.add_argument("--workers", type=int, default=1, help="vfsd workers for --spawn vfsd")
    p.add_argument("--thread-pool-size", type=int, default=0,
                   help="virtiofsd --thread-pool-size for --spawn virtiofsd (0: none)")
    p.add_argument("--workdir", metavar="DIR",
                   help="where --spawn makes its temporary export (default: $TMPDIR or /tmp; "
                        "/dev/shm takes the disk file system out of create/write numbers)")
    p.add_argument("--vfsd-args", metavar="ARGS", default="",
                   help="extra command-line arguments for spawned vfsd daemons, e.g. "
                        "'--supervisor-cpus 0 --worker-cpus 1'")
    p.add_argument("--vfsd-root", metavar="DIR",
                   help="--spawn vfsd runs the checkout in DIR (e.g. an exported older commit, "
                        "to compare); default: the one this bench comes from")
    p.add_argument("--virtiofsd", metavar="PATH",
                   help=f"virtiofsd binary (default: {find_virtiofsd() or 'not found'})")
    p.add_argument("--workload", "-w", nargs="+", default=["all"],
                   help="workloads to run, or 'all'")
    p.add_argument("--queue-depth", "-q", type=int, nargs="+", default=[16],
                   help="requests kept in flight (several: one run each)")
    p.add_argument("--duration", "-d", type=float, default=3.0, help="seconds per run")
    p.add_argument("--file-size", type=_size, default=64 * MiB,
                   help="data file for the read/write workloads (default 64M)")
    p.add_argument("--io-size", type=_size, default=MiB,
                   help="read1m/write1m request size (default 1M, capped by INIT)")
    p.add_argument("--dir-entries", type=int, default=10_000, help="readdir directory size")
    p.add_argument("--handles", type=int, default=1,
                   help="OPENs of the data file shared by the slots (default 1: one open file)")
    p.add_argument("--segment", type=_size, default=4096,
                   help="payload descriptor size (default 4096: the guest's pages; 0: one)")
    p.add_argument("--scatter", action="store_true",
                   help="payload pages in reverse guest-physical order (no two adjacent), as "
                        "a guest's page cache often is; default: adjacent pages")
    p.add_argument("--queue-size", type=int, default=1024, help="virtqueue size")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds without any completion before the run is declared stalled")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--save", metavar="FILE", help="also write the JSON to FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = list(WORKLOADS) if "all" in args.workload else args.workload
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        print(f"vfsd bench: unknown workload(s) {', '.join(unknown)}; choose from "
              f"{', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    if any(qd < 1 for qd in args.queue_depth):
        print("vfsd bench: --queue-depth must be >= 1", file=sys.stderr)
        return 2
    options = Options(file_size=args.file_size, dir_entries=args.dir_entries,
                      handles=args.handles, io_size=args.io_size)
    session_kw: dict[str, Any] = {"queue_size": args.queue_size, "segment": args.segment,
                                  "scatter": args.scatter, "timeout": args.timeout}
    spawn_kw: dict[str, Any] = {"workdir": args.workdir}
    results: list[Result] = []
    meta: list[dict[str, Any]] = []
    progress = None if args.json else (lambda r: print(
        f"  {r.daemon} {r.workload} QD{r.queue_depth}: {r.ops_per_s:.0f} {r.unit}s/s, "
        f"{r.errors} errors", file=sys.stderr, flush=True))
    try:
        if args.socket:
            label = args.label or os.path.basename(args.socket)
            with BenchSession(args.socket, pid=args.pid, label=label, options=options,
                              max_queue_depth=max(args.queue_depth), **session_kw) as s:
                meta.append(session_meta(s))
                results += run_matrix(s, names, args.queue_depth, args.duration, progress)
        else:
            for text in args.spawn:
                spec = DaemonSpec.parse(text, workers=args.workers,
                                        thread_pool_size=args.thread_pool_size,
                                        virtiofsd=args.virtiofsd,
                                        vfsd_root=args.vfsd_root)
                if spec.kind == "vfsd" and args.vfsd_args:
                    spec = dataclasses.replace(spec, extra=tuple(shlex.split(args.vfsd_args)))
                got, info = run_spawned(spec, names, args.queue_depth, args.duration, options,
                                        progress, spawn_kw=spawn_kw, **session_kw)
                results += got
                meta.append(info)
    except (BenchError, OSError, RuntimeError, ValueError) as e:
        print(f"vfsd bench: {e}", file=sys.stderr)
        if results:
            print(table(results), file=sys.stderr)
        return 2
    text = to_json(results, meta)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        print(table(results))
        orphans = orphans_text(results)
        if orphans:
            print("\nfds of deleted files held by the daemon (peak during the run):\n" + orphans)
        problems = errors_text(results)
        if problems:
            print("\nerrors (first of each run):\n" + problems)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
