"""vfsd's metrics through a real Prometheus: scraped, every dashboard query and alert
expression evaluated by Prometheus itself, and the restart-loop alert fires when provoked.
One daemon and one Prometheus for the module; the restart test runs last (it restarts slot 1).

The daemon side is the real collector and HTTP server (`vfsd.metrics`) over a fake supervisor
state and slabs written by forked 'workers' (tests/metrics/fakes.py); wiring the same into
the real daemon under a guest workload is the integration step.
"""

from __future__ import annotations

import time

import pytest

from tests.metrics.fakes import FakeSource, spawn_writer
from tests.metrics.prom import PromQLError
from tests.metrics.queries import (
    ALERTS,
    alert_rules,
    grafana_to_promql,
    panel_queries,
    variable_queries,
)
from vfsd.metrics.collector import make_registry
from vfsd.metrics.http import MetricsServer
from vfsd.metrics.slab import MetricsBook

RATE = "10s"  # $__rate_interval: >= 4 scrapes at 1 s


class FakeDaemon:
    """Two worker slots, each a forked process writing requests into its slab."""

    def __init__(self) -> None:
        self.book = MetricsBook(2)
        self.source = FakeSource(2)
        self.source.inflight = 3
        self.source.inodes = 1234
        self.source.guest_memory_bytes = 2 << 30
        self.source.ring_depths[:] = [2, 0]
        self.procs = [None, None]
        for slot in (0, 1):
            self.spawn(slot)
        self.server = MetricsServer(make_registry(self.book, self.source), "127.0.0.1:0")
        host, port = self.server.start()
        self.target = f"{host}:{port}"

    def spawn(self, slot: int) -> None:
        slab = self.book.renew(slot)  # folds the dead worker's slab, counts a restart
        # slot 0 writes straight into its slab, slot 1 through the buffered writer
        proc = spawn_writer(slab, rounds=5, handles=2 + slot, cached=10, period=0.05,
                            buffered=slot == 1)
        self.procs[slot] = proc
        self.source.pids[slot] = proc.pid

    def kill_and_respawn(self, slot: int) -> None:
        proc = self.procs[slot]
        proc.kill()
        proc.join(5)
        self.source.pids[slot] = None
        self.spawn(slot)

    def close(self) -> None:
        self.server.stop()
        for proc in self.procs:
            if proc is not None:
                proc.kill()
                proc.join(5)
        self.book.close()


@pytest.fixture(scope="module")
def daemon():
    d = FakeDaemon()
    yield d
    d.close()


@pytest.fixture(scope="module")
def prom(prometheus, daemon):
    p = prometheus([daemon.target], rule_files=[ALERTS])
    p.wait_for(lambda: p.query('up{job="vfsd"} == 1'), timeout=30, what="the vfsd target UP")
    # enough samples for rate() over RATE and for histogram_quantile
    p.wait_for(lambda: p.query(f"count_over_time(vfsd_build_info[{RATE}]) >= 5"), timeout=30,
               what="5 scrapes")
    return p


def test_target_is_scraped(prom, daemon):
    [target] = prom.targets()
    assert target["health"] == "up", target
    assert target["scrapeUrl"] == f"http://{daemon.target}/metrics"
    assert prom.query('vfsd_build_info{job="vfsd"}')


def test_a_broken_query_is_reported(prom):
    """The parse checks below are not vacuous."""
    with pytest.raises(PromQLError, match="bad_data"):
        prom.query("sum(rate(vfsd_requests_total[10s])")
    with pytest.raises(PromQLError):
        prom.evaluate_rule("vfsd_worker_open_fds / on(worker) group_left vfsd_nonsense >")


def test_every_dashboard_query_returns_data(prom):
    empty, failed = [], []
    for title, expr in panel_queries():
        promql = grafana_to_promql(expr, rate_interval=RATE, range_="1m")
        try:
            if not prom.query(promql):
                empty.append((title, promql))
        except PromQLError as e:
            failed.append((title, promql, str(e)))
    assert not failed, failed
    assert not empty, empty
    for query in variable_queries():  # label_values(vfsd_build_info, instance)
        metric = query.split("(")[1].split(",")[0]
        assert prom.label_values("instance", metric)


def test_every_alert_expression_parses_and_loads(prom):
    for rule in alert_rules():
        prom.evaluate_rule(rule["expr"])  # raises PromQLError if Prometheus rejects it
    rules = prom.wait_for(
        lambda: (r := prom.rules()) and all(x["health"] != "unknown" for x in r) and r,
        timeout=20, what="every rule evaluated once")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad


def test_alert_inputs_have_data(prom):
    """The vector each alert compares against its threshold exists (so the alert can fire)."""
    for expr in (
        'up{job="vfsd"}',
        f"increase(vfsd_worker_restarts_total[{RATE}])",
        "vfsd_worker_up",
        "vfsd_worker_heartbeat_age_seconds",
        f"sum by (instance) (rate(vfsd_request_errors_total[{RATE}])) / "
        f"sum by (instance) (rate(vfsd_requests_total[{RATE}]))",
        f"histogram_quantile(0.99, sum by (instance, op, le) "
        f"(rate(vfsd_request_duration_seconds_bucket[{RATE}])))",
        "vfsd_worker_open_fds / vfsd_worker_max_fds",
    ):
        assert prom.query(expr), expr


def test_restart_loop_alert_fires_and_counters_stay_monotonic(prom, daemon):
    assert not [a for a in prom.alerts() if a["labels"]["alertname"] == "VfsdWorkerRestartLoop"]
    started = time.time()
    for _ in range(4):  # > 3 restarts in 10 minutes
        daemon.kill_and_respawn(1)
        time.sleep(0.3)

    def firing():
        return [a for a in prom.alerts()
                if a["labels"]["alertname"] == "VfsdWorkerRestartLoop"
                and a["labels"].get("worker") == "1" and a["state"] == "firing"]

    [alert] = prom.wait_for(firing, timeout=30, what="VfsdWorkerRestartLoop to fire")
    assert alert["labels"]["severity"] == "warning"
    assert "worker 1 restarted" in alert["annotations"]["summary"]
    prom.wait_for(lambda: prom.query('vfsd_worker_restarts_total{worker="1"} == 4'),
                  timeout=10, what="restarts == 4 scraped")
    # Nothing else fired (slot 0 never restarted).
    assert not [a for a in prom.alerts() if a["labels"].get("worker") == "0"]

    # Retired totals: the respawns never made a counter go backwards.
    window = f"{time.time() - started + 60:.0f}s"
    for metric in ("vfsd_requests_total", "vfsd_request_errors_total",
                   "vfsd_request_duration_seconds_bucket", "vfsd_read_bytes_total",
                   "vfsd_written_bytes_total", "vfsd_worker_cpu_seconds_total"):
        [resets] = prom.query(f"sum(resets({metric}[{window}]))")
        assert float(resets["value"][1]) == 0, metric
