"""The operator-facing files: they parse, they only name metrics vfsd exports, and the tools
that own their formats (promtool, systemd-analyze) accept them when installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.metrics.fakes import FakeSource, write_workload
from tests.metrics.queries import (
    ALERTS,
    DASHBOARD,
    REPO,
    alert_rules,
    label_names,
    metric_names,
    panel_queries,
    variable_queries,
)
from vfsd import capabilities
from vfsd.metrics.collector import make_registry
from vfsd.metrics.slab import MetricsBook, WorkerMetrics

DEPLOY = REPO / "deploy"
GRAFANA = REPO / "grafana"
UNIT = DEPLOY / "vfsd@.service"
#: Labels a vfsd series can carry: ours, the scrape's, and histogram buckets'.
KNOWN_LABELS = {"op", "errno", "worker", "le", "instance", "job", "version", "python"}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name a populated vfsd exposes (what Prometheus will store)."""
    book = MetricsBook(1)
    try:
        m = WorkerMetrics(book.renew(0))
        m.attach()
        write_workload(m, 1)
        source = FakeSource(1)
        source.pids[0] = os.getpid()
        text = generate_latest(make_registry(book, source)).decode()
    finally:
        book.close()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# ----------------------------------------------------------------------------- grafana
def test_dashboard_is_provisioning_ready():
    dash = dashboard()
    assert dash["uid"] == "vfsd-overview" and dash["title"] == "vfsd"
    assert dash["id"] is None, "a provisioned dashboard must not carry a database id"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p["id"])
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
                for t in p["targets"]:
                    assert t["datasource"]["uid"] == "${datasource}"
                    assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
            walk(p.get("panels", []))

    walk(dash["panels"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_dashboard_covers_what_operators_need():
    exprs = " ".join(e for _t, e in panel_queries())
    for needed in ("vfsd_requests_total", "vfsd_request_duration_seconds_bucket",
                   "histogram_quantile(0.5", "histogram_quantile(0.99",
                   "vfsd_request_errors_total", "vfsd_read_bytes_total",
                   "vfsd_written_bytes_total", "vfsd_inflight_requests", "vfsd_ring_depth",
                   "vfsd_worker_cpu_seconds_total", "vfsd_worker_resident_bytes",
                   "vfsd_worker_open_fds", "vfsd_worker_restarts_total", "vfsd_inodes",
                   "vfsd_open_handles", "vfsd_cached_fds"):
        assert needed in exprs, needed


def test_dashboard_queries_use_only_exported_metrics(exported):
    for title, expr in panel_queries():
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= exported, f"{title}: {names - exported} not exported"
        assert label_names(expr) <= KNOWN_LABELS, (title, expr)
    for query in variable_queries():
        metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert metric and metric.group(1) in exported and metric.group(2) == "instance"


def test_grafana_provisioning_files():
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards.yaml").read_text())
    assert dashboards["apiVersion"] == 1
    provider = dashboards["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasource.yaml").read_text())
    assert sources["apiVersion"] == 1
    assert sources["datasources"][0]["type"] == "prometheus"


# ----------------------------------------------------------------------------- prometheus
def test_alert_rules_structure(exported):
    doc = yaml.safe_load(ALERTS.read_text())
    assert [g["name"] for g in doc["groups"]] == ["vfsd"]
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    for needed in ("VfsdDown", "VfsdWorkerRestartLoop", "VfsdErrorRatioHigh",
                   "VfsdLatencyP99High", "VfsdFdExhaustion"):
        assert needed in names
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert metric_names(rule["expr"]) <= exported | {"up"}, rule["alert"]
        assert label_names(rule["expr"]) <= KNOWN_LABELS, rule["alert"]


def test_scrape_config_example():
    doc = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in doc["scrape_configs"] if j["job_name"] == "vfsd")
    assert job["metrics_path"] == "/metrics"
    assert "127.0.0.1:9720" in job["static_configs"][0]["targets"]
    # the alert rules match this job name
    assert 'job="vfsd"' in next(r["expr"] for r in alert_rules() if r["alert"] == "VfsdDown")


promtool = shutil.which("promtool")


@pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_rules_and_config():
    run = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(alert_rules())} rules found" in run.stdout + run.stderr
    run = subprocess.run([promtool, "check", "config", "--syntax-only",
                          str(DEPLOY / "prometheus.yml")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------- systemd
def unit_sections() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None
        current.setdefault(key, []).append(value)
    return sections


def test_unit_essentials():
    service = unit_sections()["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/usr/local/bin/vfsd --config /etc/vfsd/%i.yaml"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillMode"] == ["mixed"]
    caps = set(service["CapabilityBoundingSet"][0].split())
    assert {"CAP_DAC_READ_SEARCH", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER",
            "CAP_DAC_OVERRIDE", "CAP_FSETID"} <= caps
    assert "CAP_SYS_ADMIN" not in caps
    # allow_devices: all is the default: PrivateDevices=yes would drop CAP_MKNOD and refuse
    # mknod through the device cgroup.
    assert "CAP_MKNOD" in caps and service["PrivateDevices"] == ["no"]
    assert "RestrictSUIDSGID" not in service  # the guest may create setuid files
    assert "AF_UNIX" in service["RestrictAddressFamilies"][0]
    assert "@mount" in service["SystemCallFilter"][0]
    assert "WantedBy" in unit_sections()["Install"]


systemd_analyze = shutil.which("systemd-analyze")


@pytest.mark.skipif(systemd_analyze is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists: point it at one that does.
    binary = shutil.which("vfsd") or "/bin/true"
    unit = tmp_path / "vfsd@.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/vfsd", binary))
    for name in ("vfsd@.service", "vfsd@vm1.service"):
        run = subprocess.run([systemd_analyze, "verify", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
        # Unknown or malformed directives are warnings with exit code 0: fail on any output.
        problems = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        assert run.returncode == 0 and not problems, "\n".join(problems)


def test_systemd_analyze_catches_mistakes(tmp_path):
    """The check above is not vacuous: a bad directive produces output."""
    if systemd_analyze is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "bad@.service"
    unit.write_text("[Service]\nType=notify\nExecStart=/bin/true\nProtectSystem=bogus\n")
    run = subprocess.run([systemd_analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert "bogus" in run.stdout + run.stderr


# ----------------------------------------------------------------------------- qemu / libvirt
def test_vhost_user_descriptor():
    desc = json.loads((DEPLOY / "50-vfsd.json").read_text())
    assert desc["type"] == "fs" and desc["binary"].endswith("/vfsd") and desc["description"]
    assert set(desc) <= {"description", "type", "binary", "tags"}  # vhost-user.json schema


def test_print_capabilities_is_what_libvirt_parses():
    caps = json.loads(capabilities.capabilities_json())
    assert caps["type"] == "fs"
    assert set(caps["features"]) <= {"migrate-precopy", "separate-options",
                                     "posix-acl-negotiation-mode",
                                     "security-label-negotiation-mode"}
    assert "separate-options" in caps["features"]


def test_libvirt_snippet():
    root = ET.parse(DEPLOY / "libvirt-domain-snippet.xml").getroot()
    backing = root.find("memoryBacking")
    assert backing is not None
    assert backing.find("source").get("type") == "memfd"
    assert backing.find("access").get("mode") == "shared"
    fs = root.find("devices/filesystem")
    assert fs.get("type") == "mount"
    assert fs.find("driver").get("type") == "virtiofs"
    assert fs.find("binary").get("path") == "/usr/local/bin/vfsd"
    assert fs.find("source").get("dir") and fs.find("target").get("dir")


def test_qemu_example_is_valid_bash():
    script = DEPLOY / "qemu-example.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    for needed in ("memory-backend-memfd", "share=on", "vhost-user-fs-pci", "-chardev socket"):
        assert needed in text


def test_deps_list_has_prometheus():
    deps = (REPO / "tests" / "rig" / "deps.sh").read_text()
    assert re.search(r"^\s+prometheus\s", deps, re.M)


def test_every_deploy_file_is_covered():
    """New files in deploy/ and grafana/ get a check here."""
    checked = {"50-vfsd.json", "libvirt-domain-snippet.xml", "prometheus.yml", "qemu-example.sh",
               "vfsd-alerts.yaml", "vfsd@.service", "README.md", "bootstrap.sh", "demo.sh"}
    assert {p.name for p in DEPLOY.iterdir() if p.is_file()} <= checked
    assert {str(p.relative_to(GRAFANA)) for p in GRAFANA.rglob("*") if p.is_file()} <= {
        "README.md", "vfsd-dashboard.json", "provisioning/dashboards.yaml",
        "provisioning/datasource.yaml"}


def test_deploy_readme_lists_every_file():
    text = (DEPLOY / "README.md").read_text()
    for p in DEPLOY.iterdir():
        if p.is_file() and p.name != "README.md":
            assert f"| `{p.name}` |" in text, p.name
    assert "coming later" not in text.lower()


def test_paths_in_docs_exist():
    for rel in ("deploy/vfsd-alerts.yaml", "deploy/prometheus.yml", "grafana/vfsd-dashboard.json"):
        assert Path(REPO, rel).is_file()
