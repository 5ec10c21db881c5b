"""The real thing: a real Prometheus scrapes the real vfsd while a real guest works on the
share; every dashboard query and alert input returns data, and killing workers fires the
restart-loop alert."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.daemon_proc import Daemon
from tests.metrics.queries import ALERTS, alert_rules, grafana_to_promql, panel_queries
from tests.rig.qemu import boot_guest
from vfsd import status

pytestmark = pytest.mark.guest

RATE = "10s"
MNT = "/mnt/vfs"
# A steady mix: metadata, reads, writes and a few errors (ENOTEMPTY), for about a minute.
WORKLOAD = (
    f"i=0; while [ $i -lt 600 ]; do "
    f"echo $i > {MNT}/w/f$((i % 20)); cat {MNT}/w/f$((i % 20)) >/dev/null; "
    f"ls {MNT}/w >/dev/null; stat {MNT}/missing-$i 2>/dev/null; rmdir {MNT}/w 2>/dev/null; "
    f"dd if={MNT}/w/big of=/dev/null bs=64k 2>/dev/null; "
    f"sleep 0.1; i=$((i+1)); done"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prometheus):
    work = tmp_path_factory.mktemp("metrics-guest")
    export = work / "export"
    (export / "w").mkdir(parents=True)
    (export / "w" / "big").write_bytes(os.urandom(1 << 20))
    daemon = Daemon(work, export, workers=2)
    guest = None
    try:
        target = daemon.metrics_url().removeprefix("http://").removesuffix("/metrics")
        guest = boot_guest(work, vhost_user_socket=daemon.socket_path, tag="vfs")
        guest.mount_share(MNT)
        guest.check(f"setsid sh -c '{WORKLOAD}' </dev/null >/dev/null 2>&1 &")
        prom = prometheus([target], rule_files=[ALERTS])
        prom.wait_for(lambda: prom.query('up{job="vfsd"} == 1'), timeout=30, what="target UP")
        prom.wait_for(lambda: prom.query(f"count_over_time(vfsd_build_info[{RATE}]) >= 6"),
                      timeout=40, what="6 scrapes")
        yield daemon, guest, prom
    finally:
        if guest is not None:
            guest.close()
        daemon.stop()


def test_every_dashboard_query_returns_data_under_guest_load(setup):
    _daemon, _guest, prom = setup
    empty, failed = [], []
    for title, expr in panel_queries():
        promql = grafana_to_promql(expr, rate_interval=RATE, range_="1m")
        try:
            if not prom.query(promql):
                empty.append((title, promql))
        except Exception as e:  # collected and reported together
            failed.append((title, promql, str(e)))
    assert not failed, failed
    assert not empty, empty
    # The numbers are the guest's: reads, writes and lookups are all moving.
    for op in ("read", "write", "lookup", "getattr"):
        assert prom.query(f'rate(vfsd_requests_total{{op="{op}"}}[{RATE}]) > 0'), op
    assert prom.query(f'rate(vfsd_request_errors_total{{errno="ENOTEMPTY"}}[{RATE}]) > 0')
    assert prom.query(f"rate(vfsd_read_bytes_total[{RATE}]) > 0")


def test_alert_rules_load_and_evaluate(setup):
    _daemon, _guest, prom = setup
    for rule in alert_rules():
        prom.evaluate_rule(rule["expr"])
    rules = prom.wait_for(
        lambda: (r := prom.rules()) and all(x["health"] != "unknown" for x in r) and r,
        timeout=20, what="every rule evaluated once")
    assert all(r["health"] == "ok" for r in rules), rules


def test_restart_loop_alert_fires_when_workers_are_killed(setup):
    daemon, guest, prom = setup
    status_path = daemon.socket_path + ".status"
    for _ in range(4):
        pid = status.query(status_path)["workers"][1]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new = status.query(status_path)["workers"][1]["pid"]
            if new and new != pid:
                break
            time.sleep(0.1)
        time.sleep(1.5)  # not a tight loop: stays under the daemon's own halt threshold
    prom.wait_for(lambda: prom.query('vfsd_worker_restarts_total{worker="1"} >= 4'),
                  timeout=20, what="4 restarts scraped")
    firing = prom.wait_for(
        lambda: [a for a in prom.alerts()
                 if a["labels"]["alertname"] == "VfsdWorkerRestartLoop"],
        timeout=60, what="VfsdWorkerRestartLoop active")
    assert firing
    # The guest never noticed beyond EIO on requests the dead workers held.
    guest.check(f"ls {MNT}/w >/dev/null")
