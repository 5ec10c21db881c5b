"""`vfsd bench`: a vhost-user front-end load generator for any virtio-fs back-end.

It plays QEMU and the guest's virtio-fs driver (memfd guest RAM, the vhost-user handshake,
hiprio + one request queue, FUSE_INIT), keeps `queue_depth` FUSE requests in flight, checks
every reply, and reports ops/s, MB/s, latency percentiles, the daemon's CPU per op (from
/proc, all its processes and threads) and its own CPU, so a reader can tell which side is
the bottleneck. See docs/PERFORMANCE.md for the numbers and how to read them.

As a library::

    from vfsd.bench import BenchSession, DaemonSpec, run_spawned

    results, meta = run_spawned(DaemonSpec("vfsd", 2), ["getattr"], [16], duration=1.0)
    with BenchSession("/run/vfsd.sock", pid=1234) as session:
        print(session.run("read4k", queue_depth=16, duration=2.0).ops_per_s)

Modules: `engine` (the pipelined loop and slots), `workloads` (what each request is and what
a correct reply looks like), `runner` (sessions, CPU accounting, `Result`), `procstat`
(/proc), `daemons` (spawning vfsd / virtiofsd), `report` (table, JSON), `cli`.
"""

from vfsd.bench.daemons import DaemonSpec, SpawnedDaemon
from vfsd.bench.engine import BenchError, Engine
from vfsd.bench.runner import BenchSession, Result, run_matrix, run_spawned
from vfsd.bench.workloads import WORKLOADS, Options

__all__ = ["WORKLOADS", "BenchError", "BenchSession", "DaemonSpec", "Engine", "Options",
           "Result", "SpawnedDaemon", "run_matrix", "run_spawned"]
