"""Prometheus metrics: per-worker shared-memory slabs, the scrape-time collector, the HTTP server.

- `vfsd.metrics.slab`: the slab layout, `WorkerMetrics` / `BufferedWorkerMetrics` (the
  worker's lock-free writers) and `MetricsBook` (the supervisor's slabs, one per worker slot
  and one for itself, plus the retired totals).
- `vfsd.metrics.collector`: `VfsdCollector`, which merges the slabs and the supervisor's
  `MetricsSource` into `vfsd_*` families at scrape time.
- `vfsd.metrics.http`: `MetricsServer`, the exposition endpoint on `metrics_listen`.
"""
