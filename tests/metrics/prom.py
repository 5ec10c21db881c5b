"""A real Prometheus for tests: Debian's `prometheus` binary on a temp dir and a free loopback
port, scraping given targets every second, with rule files loaded (see conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS = os.environ.get("VFSD_PROMETHEUS", "/usr/bin/prometheus")
SCRAPE_INTERVAL = "1s"


class PromQLError(Exception):
    """Prometheus rejected a query (status "error": bad_data, execution, ...)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir: Path, targets: Sequence[str], *,
                 rule_files: Sequence[Path] = (), job: str = "vfsd",
                 scrape_interval: str = SCRAPE_INTERVAL) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        rules = []
        for i, path in enumerate(rule_files):
            copy = workdir / f"rules-{i}-{Path(path).name}"
            shutil.copy(path, copy)
            rules.append(str(copy))
        config = {
            "global": {"scrape_interval": scrape_interval,
                       "scrape_timeout": scrape_interval,
                       "evaluation_interval": scrape_interval},
            "rule_files": rules,
            "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                                "static_configs": [{"targets": list(targets)}]}],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
        try:
            self.wait_for(self._ready, timeout=60, what="Prometheus to become ready")
        except BaseException:
            self.stop()
            raise

    # -- HTTP API ---------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(params, doseq=True)
                                 if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400 bad_data, 422 execution: JSON error body
            body = json.load(e)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; returns the result vector (raises PromQLError if it does not parse
        or fails to evaluate)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._get("/api/v1/query", params)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [{"value": result}]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self._get("/api/v1/query_range",
                         {"query": expr, "start": start, "end": end, "step": step})["result"]

    def evaluate_rule(self, expr: str) -> list[dict]:
        """What a rule expression yields now (the series an alert would fire for)."""
        return self.query(expr)

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", {"match[]": match})

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["activeTargets"]

    def rules(self) -> list[dict]:
        return [r for g in self._get("/api/v1/rules")["groups"] for r in g["rules"]]

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts")["alerts"]

    # -- helpers ------------------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0,
                 what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                   f"prometheus log:\n{self.log()[-3000:]}")
            time.sleep(0.25)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()
