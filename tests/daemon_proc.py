"""Start and stop a real vfsd process for tests (daemon tests and guest tests share it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Daemon:
    """`python -m vfsd` on a socket path; its stderr log goes to a file the tests can read."""

    def __init__(self, workdir: Path, export: Path, workers: int = 1,
                 extra: list[str] | None = None) -> None:
        self.socket_path = str(workdir / "vfsd.sock")
        self.log_path = workdir / "vfsd.log"
        self.export = export
        extra = list(extra or [])
        args = [sys.executable, "-m", "vfsd", "--socket-path", self.socket_path,
                "--shared-dir", str(export), "--metrics-listen", "127.0.0.1:0"]
        if "--config" not in extra:  # with a config file the test controls these there
            args += ["--workers", str(workers), "--log-level", "debug"]
        args += extra
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vfsd exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vfsd did not create its socket:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics_url(self) -> str:
        """From the start-up line (the tests let vfsd pick a free port)."""
        deadline = time.monotonic() + 10  # the socket appears before the ready line
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if "vfsd ready" in line and "metrics=" in line:
                    return line.split("metrics=")[1].split()[0]
            time.sleep(0.05)
        raise AssertionError("no metrics URL in the daemon log")

    def served_per_worker(self) -> list[int]:
        """From the shutdown log line 'requests served per worker: w0=N w1=M ...'."""
        for line in reversed(self.log().splitlines()):
            if "requests served per worker:" in line:
                words = line.split("requests served per worker:")[1].split()
                return [int(w.split("=")[1]) for w in words if w.startswith("w")]
        raise AssertionError("no per-worker summary in the daemon log")

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
