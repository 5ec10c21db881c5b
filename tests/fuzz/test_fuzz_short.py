"""CI: every fuzz target for a few seconds, seeded from its saved corpus (docs/RELIABILITY.md).

A crash, a hang (5 s per input) or an RSS above 1 GiB fails the test, with libFuzzer's
report; the input is saved in tests/artifacts/fuzz/ (replay it with
`python -m tests.fuzz TARGET FILE`). Longer runs: `make fuzz`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.__main__ import TARGETS

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
ARTIFACTS = REPO / "tests" / "artifacts" / "fuzz"
SECONDS = 3


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_briefly(target: str, tmp_path: Path) -> None:
    found = tmp_path / "found"  # libFuzzer adds new inputs to the first corpus directory
    found.mkdir()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", target, f"-max_total_time={SECONDS}",
         "-timeout=5", "-rss_limit_mb=1024", "-print_final_stats=1",
         f"-artifact_prefix={ARTIFACTS}/{target}-", str(found), str(CORPUS / target)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=120)
    report = proc.stderr
    start = max(report.find("=== Uncaught Python exception"), report.find("==ERROR"), 0)
    assert proc.returncode == 0, f"{target} crashed:\n{report[start:][-8000:]}"
    assert "stat::number_of_executed_units" in report, report[-4000:]
