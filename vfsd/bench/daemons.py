"""Start a back-end on a fresh temporary export for a bench run: vfsd or a virtiofsd.

Why here and not in the tests: `vfsd bench --spawn ...` compares daemons on equal terms (same
export file system, same front-end), so starting them is part of the tool. The daemon runs in
its own session (Ctrl-C reaches only the bench, which stops it in order); its log goes to a
file shown on failure. Both vfsd and virtiofsd exit when the front-end disconnects.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import vfsd

DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # QEMU 7.2's C virtiofsd (Debian 12)
KINDS = ("vfsd", "virtiofsd")
SOCKET_WAIT = 30.0


@dataclass(frozen=True)
class DaemonSpec:
    """What to start: `kind` with `threads` (vfsd --workers / virtiofsd --thread-pool-size)."""

    kind: str
    threads: int
    binary: str | None = None  # virtiofsd path
    extra: tuple[str, ...] = ()
    root: str | None = None  # vfsd: run the checkout in this directory (default: this one)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.threads}"

    @classmethod
    def parse(cls, text: str, *, workers: int = 1, thread_pool_size: int = 0,
              virtiofsd: str | None = None, vfsd_root: str | None = None) -> DaemonSpec:
        """`vfsd`, `vfsd:N`, `virtiofsd`, `virtiofsd:N`; `vfsd:0` is vfsd's own default
        (`workers: 0`, one per CPU it may use)."""
        kind, _, n = text.partition(":")
        if kind not in KINDS:
            raise ValueError(f"--spawn {text}: daemon must be one of {', '.join(KINDS)}")
        default = workers if kind == "vfsd" else thread_pool_size
        try:
            threads = int(n) if n else default
        except ValueError:
            raise ValueError(f"--spawn {text}: {n!r} is not a number") from None
        if threads < 0:
            raise ValueError(f"--spawn {text}: bad thread/worker count {threads}")
        if kind == "virtiofsd":
            return cls(kind, threads, binary=virtiofsd)
        return cls(kind, threads, root=vfsd_root)


def find_virtiofsd(path: str | None = None) -> str | None:
    """The reference daemon: `path`, else QEMU's C virtiofsd, else `virtiofsd` on PATH."""
    for candidate in (path, DEFAULT_VIRTIOFSD, shutil.which("virtiofsd"),
                      "/usr/libexec/virtiofsd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def vfsd_root() -> str:
    """The checkout this bench runs from (vfsd and workers are siblings there)."""
    return str(Path(vfsd.__file__).resolve().parents[1])


def vfsd_env(root: str | None = None) -> dict[str, str]:
    """PYTHONPATH so `python -m vfsd` finds the checkout `root` (default: this one)."""
    root = root or vfsd_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


class SpawnedDaemon:
    """A daemon on `<tmp>/export`, listening on `<tmp>/vhost.sock`; `stop()` removes it all."""

    def __init__(self, spec: DaemonSpec, *, workdir: str | None = None,
                 log_level: str = "warning") -> None:
        self.spec = spec
        self.workdir = Path(tempfile.mkdtemp(prefix="vfsd-bench-", dir=workdir))
        self.export = self.workdir / "export"
        self.export.mkdir()
        self.socket_path = str(self.workdir / "vhost.sock")
        self.log_path = self.workdir / "daemon.log"
        if spec.kind == "vfsd":
            argv = [sys.executable, "-m", "vfsd", "--socket-path", self.socket_path,
                    "--shared-dir", str(self.export), "--workers", str(spec.threads),
                    "--log-level", log_level,
                    # metrics stay on (as in production) on a free port
                    "--metrics-listen", "127.0.0.1:0", *spec.extra]
            env = vfsd_env(spec.root)
            cwd = spec.root or vfsd_root()  # `python -m` looks in the cwd first
        else:
            binary = find_virtiofsd(spec.binary)
            if binary is None:
                raise FileNotFoundError("no virtiofsd found (give --virtiofsd PATH)")
            argv = [binary, f"--socket-path={self.socket_path}", "-o",
                    f"source={self.export}", f"--thread-pool-size={spec.threads}", *spec.extra]
            env = dict(os.environ)
            cwd = str(self.workdir)
        self.argv = argv
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)
        try:
            self._wait_for_socket()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + SOCKET_WAIT
        while True:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.label} exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.label} made no socket in {SOCKET_WAIT:g} s")
            time.sleep(0.02)

    def stop(self, grace: float = 5.0) -> int | None:
        """Wait briefly (it exits once we disconnect), then SIGTERM, then SIGKILL the group."""
        proc = self.proc
        if proc.poll() is None:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # helpers left in its session, if any
        shutil.rmtree(self.workdir, ignore_errors=True)
        return proc.returncode

    def __enter__(self) -> SpawnedDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
