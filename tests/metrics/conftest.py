"""A real Prometheus for metrics tests: Debian's `prometheus` binary on a temp dir and a free
loopback port, scraping given targets every second, with rule files loaded.

    def test_x(prometheus):
        prom = prometheus(["127.0.0.1:9720"], rule_files=[ALERTS])
        prom.wait_for(lambda: prom.query('up{job="vfsd"}'), timeout=20)
        prom.query("sum(rate(vfsd_requests_total[10s]))")   # -> the result list
        prom.alerts()                                       # -> active alerts

`tests/rig/deps.sh` installs the package; without the binary the tests are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tests.metrics.prom import PROMETHEUS, Prometheus


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[Callable[..., Prometheus]]:
    """Factory: `prometheus(targets, rule_files=...)` starts one (stopped after the test
    module, so a module can share one Prometheus between its tests)."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} not installed (Debian package prometheus; tests/rig/deps.sh)")
    started: list[Prometheus] = []

    def start(targets: Sequence[str], **kwargs: Any) -> Prometheus:
        workdir = tmp_path_factory.mktemp("prometheus")
        prom = Prometheus(workdir, targets, **kwargs)
        started.append(prom)
        return prom

    yield start
    for prom in started:
        prom.stop()
