"""Boot a real Linux guest in QEMU and run shell commands in it.

Why: vfsd is only proven when a real guest kernel (virtiofs.ko) talks to it through QEMU's
vhost-user-fs device. ``Guest`` boots the cached image from ``tests.rig.build`` with an
optional vhost-user-fs share and/or a virtio-9p share (the 9p share is the reference file
system the rig is tested against), and runs commands over a dedicated virtio-serial channel
(see ``tests/rig/agent.sh`` for the framing). The kernel console goes to ``console_path``.

Accelerator: ``$VFSD_ACCEL`` = ``tcg`` | ``kvm`` | ``auto`` (default). ``auto`` probes KVM once
(nested KVM can hang at early boot) and falls back to TCG; the verdict is cached per process
and in ``<cache>/accel.json`` for the current host boot. With ``$CI`` set, ``auto`` = ``tcg``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import itertools
import json
import math
import os
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.rig import build as rigbuild

AGENT_PORT_NAME = "vfsd.agent"
CONSOLE_TAIL_LINES = 60
#: Every boot of this process: (name, seconds, accel). Printed in the pytest summary.
BOOT_LOG: list[tuple[str, float, str]] = []

_live: weakref.WeakSet[Guest] = weakref.WeakSet()
_accel_verdict: str | None = None
_names = itertools.count(1)


class GuestError(AssertionError):
    """The guest failed: command error, timeout, boot failure or QEMU death.

    An AssertionError so pytest reports it as a plain test failure with the full message.
    """


class GuestCommandError(GuestError):
    """``Guest.check``: the command exited non-zero."""


class GuestTimeout(GuestError):
    """A command (or the boot) did not finish in time."""


class GuestDied(GuestError):
    """QEMU exited (kernel panic, crash, killed) while we were waiting on it."""


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64 (``$VFSD_QEMU`` overrides), or None if not installed."""
    return shutil.which(os.environ.get("VFSD_QEMU") or "qemu-system-x86_64")


def live_guests() -> list[Guest]:
    """Guests that are currently running (for failure reports)."""
    return [g for g in list(_live) if g.alive]


# --------------------------------------------------------------------------------------------
# accelerator choice


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _verdict_file() -> Path:
    return rigbuild.cache_dir() / "accel.json"


def _host_fingerprint() -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "?"
    qemu = qemu_binary() or "?"
    with contextlib.suppress(OSError):
        qemu += f"@{os.stat(qemu).st_mtime_ns}"
    return f"{boot_id}|{os.uname().release}|{qemu}"


def cached_accel_verdict() -> str | None:
    """'kvm' or 'tcg' if already known for this host boot, else None (a probe is needed)."""
    global _accel_verdict
    if _accel_verdict:
        return _accel_verdict
    if not _kvm_usable():
        _accel_verdict = "tcg"
        return _accel_verdict
    if os.environ.get("CI"):
        _accel_verdict = "tcg"
        return _accel_verdict
    with contextlib.suppress(OSError, ValueError, KeyError):
        info = json.loads(_verdict_file().read_text())
        if info["host"] == _host_fingerprint() and info["accel"] in ("kvm", "tcg"):
            _accel_verdict = info["accel"]
    return _accel_verdict


def _record_verdict(accel: str, reason: str | None = None) -> None:
    global _accel_verdict
    _accel_verdict = accel
    with contextlib.suppress(OSError):
        path = _verdict_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_text(json.dumps({"host": _host_fingerprint(), "accel": accel,
                                   "reason": reason}))
        os.replace(tmp, path)


def kvm_failure() -> str | None:
    """Why guests run without KVM on this host (this boot), or None if KVM works or was not
    tried yet: for advice such as which -accel to suggest."""
    if not _kvm_usable():
        return "/dev/kvm is missing or not accessible"
    with contextlib.suppress(OSError, ValueError, KeyError):
        info = json.loads(_verdict_file().read_text())
        if info["host"] == _host_fingerprint() and info["accel"] == "tcg":
            return info.get("reason") or "the KVM probe failed"
    return None


def _accel_mode(requested: str | None) -> str:
    mode = (requested or os.environ.get("VFSD_ACCEL") or "auto").strip().lower()
    if mode not in ("auto", "kvm", "tcg"):
        raise ValueError(f"accel must be auto|kvm|tcg, not {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------
# process plumbing


def _pdeathsig() -> None:
    """In the QEMU child: die with SIGKILL if the parent (pytest) dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _reap(proc: subprocess.Popen[bytes], files: list[Any]) -> None:
    """Finalizer: kill QEMU. Must not reference the Guest (weakref.finalize)."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(5)
    for f in files:
        with contextlib.suppress(Exception):
            f.close()


def probe_kvm(image: rigbuild.GuestImage | None = None) -> str:
    """Boot a share-less guest under KVM once; return and cache 'kvm' if it works, else 'tcg'.

    Separate from the real boot because a vhost-user daemon may exit when QEMU disconnects,
    so the real guest must not be the one that gets killed when KVM turns out to hang.
    """
    probe = float(os.environ.get("VFSD_KVM_PROBE_TIMEOUT", "6"))
    workdir = tempfile.mkdtemp(prefix="vfsd-kvm-probe-")
    g = Guest(workdir, accel="kvm", image=image, name="kvm-probe", smp=1, mem="256M")
    g.image = image or rigbuild.build()
    reason = None
    try:
        g._boot("kvm", max(60.0, probe), first_output_timeout=probe)
    except GuestError as e:
        reason = _first_line(e)
    finally:
        g.close(graceful=False)
    if reason is None:
        shutil.rmtree(workdir, ignore_errors=True)
        _record_verdict("kvm")
        return "kvm"
    # QEMU's own words say why (e.g. an assertion in its KVM code): show them, keep the logs.
    said = [ln for ln in _tail(g.qemu_log_path, 40).splitlines() if not ln.startswith("=== ")]
    print(f"KVM probe failed ({reason}); using TCG", file=sys.stderr)
    if said:
        print("QEMU said:\n" + "\n".join(f"  {ln}" for ln in said[-5:]), file=sys.stderr)
        reason += f"; QEMU: {said[-1].strip()}"
    print(f"(probe logs kept in {workdir})", file=sys.stderr)
    _record_verdict("tcg", reason)
    return "tcg"


class Guest:
    """One QEMU guest with an optional vhost-user-fs and/or virtio-9p share.

    ``Guest(...)`` only configures; ``start()`` (or ``with Guest(...) as g``, or
    ``boot_guest``) boots and returns once the command agent is up.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        vhost_user_socket: str | os.PathLike[str] | None = None,
        tag: str | None = None,
        queue_size: int = 128,
        num_request_queues: int = 1,
        p9_dir: str | os.PathLike[str] | None = None,
        p9_tag: str | None = None,
        p9_security_model: str = "passthrough",
        mem: str = "512M",
        smp: int = 2,
        accel: str | None = None,
        extra_args: Sequence[str] = (),
        append: str = "",
        boot_timeout: float = 180.0,
        socket_wait: float = 10.0,
        name: str | None = None,
        image: rigbuild.GuestImage | None = None,
    ) -> None:
        self.name = name or f"guest{next(_names)}"
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"vfsd-{self.name}-")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_path = self.workdir / f"{self.name}-console.log"
        self.qemu_log_path = self.workdir / f"{self.name}-qemu.log"
        self.vhost_user_socket = str(vhost_user_socket) if vhost_user_socket else None
        self.vhost_tag = (tag or "vfs") if self.vhost_user_socket else None
        self.queue_size = queue_size
        self.num_request_queues = num_request_queues
        self.p9_dir = str(p9_dir) if p9_dir else None
        if self.p9_dir:
            self.p9_tag = p9_tag or (tag if tag and not self.vhost_user_socket else "p9")
        else:
            self.p9_tag = None
        self.p9_security_model = p9_security_model
        self.mem = mem
        self.smp = smp
        self.accel_mode = _accel_mode(accel)
        self.extra_args = list(extra_args)
        self.append = append
        self.boot_timeout = boot_timeout
        self.socket_wait = socket_wait
        self.image = image
        #: Set once booted.
        self.accel: str | None = None
        self.boot_seconds: float | None = None
        self.qemu_args: list[str] = []
        self.healthy = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._seq = itertools.count(1)
        self._lock = threading.RLock()
        self._finalizer: weakref.finalize | None = None
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    @property
    def pid(self) -> int | None:
        """QEMU's pid (None before start)."""
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        """QEMU is running."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def share_tag(self) -> str | None:
        """Tag of the vhost-user-fs share, else of the 9p share."""
        return self.vhost_tag or self.p9_tag

    def start(self) -> Guest:
        """Boot and wait for the agent. Picks the accelerator (see module doc)."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        try:
            if self.image is None:
                self.image = rigbuild.build()
            mode = self.accel_mode
            if mode == "auto":
                mode = cached_accel_verdict() or probe_kvm(self.image)
            self._boot(mode, self.boot_timeout)
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def _cmdline(self) -> str:
        parts = [
            "console=ttyS0,115200",
            "rdinit=/init",
            "panic=-1",
            "8250.nr_uarts=1",
            "mitigations=off",
            "random.trust_cpu=on",
        ]
        if self.append:
            parts.append(self.append)
        return " ".join(parts)

    def _build_args(self, accel: str, agent_fd: int) -> list[str]:
        assert self.image is not None
        qemu = qemu_binary()
        if not qemu:
            raise GuestError("qemu-system-x86_64 not found (run tests/rig/deps.sh)")
        args = [
            qemu,
            "-name", self.name,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "pc", "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(self.smp),
            "-m", self.mem,
            "-object", f"memory-backend-memfd,id=mem,size={self.mem},share=on",
            "-numa", "node,memdev=mem",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", self._cmdline(),
            "-chardev", f"file,id=con0,path={self.console_path}",
            "-serial", "chardev:con0",
            "-chardev", f"socket,id=agent0,fd={agent_fd}",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
        ]  # fmt: skip
        if self.vhost_user_socket:
            args += [
                "-chardev", f"socket,id=vfs0,path={self.vhost_user_socket}",
                "-device",
                f"vhost-user-fs-pci,chardev=vfs0,tag={self.vhost_tag},"
                f"queue-size={self.queue_size},num-request-queues={self.num_request_queues}",
            ]  # fmt: skip
        if self.p9_dir:
            args += [
                "-fsdev",
                f"local,id=p9fs0,path={self.p9_dir},security_model={self.p9_security_model}",
                "-device", f"virtio-9p-pci,fsdev=p9fs0,mount_tag={self.p9_tag}",
            ]  # fmt: skip
        return args + self.extra_args

    def _boot(self, accel: str, timeout: float, first_output_timeout: float | None = None) -> None:
        """Launch QEMU and wait for the agent's READY.

        ``first_output_timeout``: fail early if the console stays empty that long (the way
        nested KVM hangs: before the kernel prints anything).
        """
        if self.vhost_user_socket:
            self._wait_for_socket(self.vhost_user_socket)
        host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.qemu_args = self._build_args(accel, guest_end.fileno())
        self.console_path.write_bytes(b"")
        qlog = open(self.qemu_log_path, "ab")  # noqa: SIM115 (closed by _reap/close)
        qlog.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.qemu_args)}\n".encode())
        qlog.flush()
        t0 = time.monotonic()
        main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            self.qemu_args,
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=subprocess.STDOUT,
            pass_fds=[guest_end.fileno()],
            preexec_fn=_pdeathsig if main else None,
        )
        guest_end.close()
        host_end.setblocking(False)
        self._sock = host_end
        self._buf = b""
        self._finalizer = weakref.finalize(self, _reap, self._proc, [host_end, qlog])
        _live.add(self)
        self.accel = accel
        deadline = t0 + timeout
        if first_output_timeout is not None:
            early = t0 + first_output_timeout
            while self.console_path.stat().st_size == 0:
                if time.monotonic() > early:
                    raise GuestTimeout(
                        f"{self.name}: no console output within {first_output_timeout:g} s"
                        f" ({accel})"
                    )
                if self._proc.poll() is not None:
                    self._died(f"boot ({accel})")
                time.sleep(0.05)
        while True:
            line = self._readline(deadline, what=f"boot ({accel})")
            if line.startswith(b"@@READY"):
                break
        self.boot_seconds = time.monotonic() - t0
        self.healthy = True
        BOOT_LOG.append((self.name, self.boot_seconds, accel))
        print(
            f"guest boot: {self.boot_seconds:.1f} s ({accel}) [{self.name}]",
            file=sys.stderr,
            flush=True,
        )

    def _wait_for_socket(self, path: str) -> None:
        """Give a just-started daemon ``socket_wait`` s to create its socket (QEMU connects
        once, at start-up). Only checks that the path exists: a probing connect could look
        like a front-end that came and went."""
        deadline = time.monotonic() + self.socket_wait
        while True:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    return
            if time.monotonic() >= deadline:
                raise GuestError(
                    f"{self.name}: vhost-user socket {path} did not appear within"
                    f" {self.socket_wait:g} s (is the daemon listening?)"
                )
            time.sleep(0.05)

    def _kill(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # kills QEMU, closes the socket and log
        self._finalizer = None
        self._proc = None
        self._sock = None
        self.healthy = False

    def close(self, graceful: bool = True, timeout: float = 3.0) -> None:
        """Power the guest off (briefly, if asked and possible), then make sure QEMU is gone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            proc = self._proc
            if graceful and self.healthy and proc is not None and proc.poll() is None:
                with contextlib.suppress(Exception):
                    self._send("poweroff", "sync; poweroff -f", 5)
                    proc.wait(timeout)
            self._kill()
            _live.discard(self)

    def __enter__(self) -> Guest:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "down"
        return f"<Guest {self.name} {state} accel={self.accel} console={self.console_path}>"

    # ---------------------------------------------------------------- channel

    def _readline(self, deadline: float, what: str) -> bytes:
        """Next line from the agent; raises GuestTimeout / GuestDied with the console tail."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                return line.rstrip(b"\r")
            now = time.monotonic()
            if now >= deadline:
                self.healthy = False
                raise GuestTimeout(self._report(f"{self.name}: timed out waiting for {what}"))
            assert self._sock is not None and self._proc is not None
            r, _, _ = select.select([self._sock], [], [], min(0.25, deadline - now))
            if r:
                try:
                    chunk = self._sock.recv(1 << 16)
                except BlockingIOError:
                    chunk = None
                except OSError:  # ECONNRESET: QEMU went away
                    chunk = b""
                if chunk == b"":
                    self._died(what)
                if chunk:
                    self._buf += chunk
            elif self._proc.poll() is not None:
                self._died(what)

    def _died(self, what: str) -> None:
        self.healthy = False
        assert self._proc is not None
        with contextlib.suppress(Exception):
            self._proc.wait(2)
        rc = self._proc.poll()
        qlog = _tail(self.qemu_log_path, 15)
        raise GuestDied(
            self._report(f"{self.name}: QEMU exited (rc={rc}) while waiting for {what}")
            + f"\n--- QEMU log ({self.qemu_log_path}) ---\n{qlog}"
        )

    def _send(self, rid: str, cmd: str, guest_timeout: int) -> None:
        assert self._sock is not None
        payload = base64.b64encode(cmd.encode()).decode()
        data = f"CMD {rid} {guest_timeout} {payload}\n".encode()
        self._sock.settimeout(30)
        try:
            self._sock.sendall(data)
        except OSError as e:
            self.healthy = False
            if self._proc is not None and self._proc.poll() is None:
                raise GuestError(self._report(f"{self.name}: agent channel: {e}")) from e
            self._died(f"sending {cmd!r}")
        finally:
            self._sock.setblocking(False)

    def run_bytes(self, cmd: str, timeout: float = 60) -> tuple[int, bytes]:
        """Like ``run`` but returns the raw output bytes."""
        with self._lock:
            if self._proc is None or self._sock is None:
                raise GuestDied(self._report(f"{self.name} is not running; cannot run: {cmd}"))
            if self._proc.poll() is not None:
                self._died(f"command {cmd!r}")
            rid = f"{next(self._seq):x}x{secrets.token_hex(4)}"
            gtimeout = max(1, math.ceil(timeout))
            self._send(rid, cmd, gtimeout)
            # Grace for the guest's own kill + the base64 transfer of the output.
            deadline = time.monotonic() + timeout + 15 + 0.5 * gtimeout
            what = f"command {cmd!r} (timeout {timeout:g} s)"
            while self._readline(deadline, what) != f"@@BEGIN {rid}".encode():
                pass
            chunks: list[bytes] = []
            while True:
                line = self._readline(deadline, what)
                if line.startswith(b"@@END "):
                    _, end_id, rc_s, flag = [*line.decode().split(), "", "", ""][:4]
                    if end_id != rid:
                        raise GuestError(self._report(f"protocol error: {line!r} for {rid}"))
                    break
                chunks.append(line)
            out = base64.b64decode(b"".join(chunks))
            if flag == "timeout":
                raise GuestTimeout(
                    self._report(
                        f"{self.name}: command timed out after {timeout:g} s (killed in guest):"
                        f" {cmd}",
                        out,
                    )
                )
            if flag == "badcmd":
                raise GuestError(self._report(f"agent could not decode command: {cmd}"))
            return int(rc_s), out

    def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        """Run ``cmd`` with ``sh`` in the guest; (exit code, stdout+stderr). Raises on timeout."""
        rc, out = self.run_bytes(cmd, timeout)
        return rc, out.decode(errors="replace")

    def check(self, cmd: str, timeout: float = 60) -> str:
        """Run ``cmd``; return its output, or raise GuestCommandError (rc, output, console)."""
        rc, out = self.run_bytes(cmd, timeout)
        if rc != 0:
            raise GuestCommandError(
                self._report(f"{self.name}: guest command failed (rc={rc}): {cmd}", out)
            )
        return out.decode(errors="replace")

    # ---------------------------------------------------------------- helpers

    def mount_share(
        self, mnt: str = "/mnt/share", kind: str | None = None, options: str = ""
    ) -> str:
        """Mount the attached share (virtiofs if any, else 9p) at ``mnt``; returns ``mnt``."""
        kind = kind or ("virtiofs" if self.vhost_tag else "9p")
        if kind == "virtiofs":
            if not self.vhost_tag:
                raise ValueError("no vhost-user-fs share attached")
            opts = f"-o {options}" if options else ""
            self.check(f"mkdir -p {mnt} && mount -t virtiofs {opts} {self.vhost_tag} {mnt}")
        elif kind == "9p":
            if not self.p9_tag:
                raise ValueError("no 9p share attached")
            opts = "trans=virtio,version=9p2000.L,msize=524288,cache=none"
            if options:
                opts += "," + options
            self.check(f"mkdir -p {mnt} && mount -t 9p -o {opts} {self.p9_tag} {mnt}")
        else:
            raise ValueError(f"unknown share kind {kind!r}")
        return mnt

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """Last ``lines`` lines of the kernel console."""
        return _tail(self.console_path, lines)

    def _report(self, headline: str, output: bytes | None = None) -> str:
        parts = [headline]
        if output is not None:
            text = output.decode(errors="replace")
            if len(text) > 20000:
                text = "[... truncated ...]\n" + text[-20000:]
            parts.append(f"--- output ---\n{text}" + ("" if text.endswith("\n") else "\n"))
        parts.append(
            f"--- guest console, last {CONSOLE_TAIL_LINES} lines ({self.console_path}) ---\n"
            + self.console_tail()
        )
        return "\n".join(parts)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    text = data.decode(errors="replace").replace("\r\n", "\n")
    return "\n".join(text.splitlines()[-lines:])


def boot_guest(tmp_path: str | os.PathLike[str], **kwargs: Any) -> Guest:
    """Boot a guest whose logs live under ``tmp_path``; returns it started.

    Use as ``with boot_guest(tmp_path, vhost_user_socket=sock, tag="vfs") as g: ...`` (the
    daemon must already listen on ``sock``). Keyword arguments are ``Guest``'s.
    """
    g = Guest(tmp_path, **kwargs)
    return g.start()
