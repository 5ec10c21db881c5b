"""The vfsd demo: serve a host directory with vfsd and mount it in a real Linux guest.

Run through ``bash deploy/demo.sh`` (which installs the dependencies and builds the guest
image first), or directly as ``python -m tests.rig.demo [options]`` from the repository.

What it does: starts vfsd on ``/var/tmp/vfsd-demo/vfsd.sock`` exporting
``/var/tmp/vfsd-demo/export`` (or ``--export DIR``), boots the test rig's guest
(``tests/rig/qemu.py``) with a ``vhost-user-fs-pci`` device on that socket, mounts the share at
``/mnt/vfs`` and prints a terminal-like transcript of the guest using it. ``--shell`` then
hands the guest to you; ``--no-guest`` only runs vfsd and prints the QEMU options for your own
VM. Whatever happens (error, Ctrl-C, SIGTERM), the share is unmounted, the guest powered
off, vfsd stopped and the log locations printed: nothing is left running.

Undocumented, for testing the demo itself: ``VFSD_DEMO_DAEMON`` replaces the daemon command
with a virtiofsd-compatible one, e.g. ``VFSD_DEMO_DAEMON=/usr/lib/qemu/virtiofsd``; it is
called as ``<cmd> --socket-path=SOCK -o source=EXPORT``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import secrets
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from tests.rig.qemu import Guest, GuestError, GuestTimeout, kvm_failure, qemu_binary

REPO = Path(__file__).resolve().parents[2]
WORKDIR = Path("/var/tmp/vfsd-demo")
DEFAULT_EXPORT = WORKDIR / "export"
MNT = "/mnt/vfs"
TAG = "vfs"
FIO_FILE = ".vfsd-demo-fio.bin"  # the throughput test's scratch file in the export
GUEST_NAME = "vfsd-demo"
SOCKET_WAIT = 30.0  # s for the daemon to create its socket
CMD_TIMEOUT = 120.0  # s per transcript command
SHELL_TIMEOUT = 300.0  # s per --shell command
LOG_TAIL = 40
SERVED_MARK = "requests served per worker:"

README_TEXT = """\
Hello from the host!

This directory ({export}) is exported by vfsd, a virtio-fs host daemon, and
mounted in the demo guest at {mnt} with `mount -t virtiofs {tag} {mnt}`.
Files the guest writes there show up here, and the other way round.

Written by the vfsd demo (deploy/demo.sh) on {when}.
"""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C (clean up, then exit)."""


class DemoError(Exception):
    """A failure the demo explains itself (the message is the explanation)."""


def say(text: str = "", *, file: IO[str] | None = None) -> None:
    print(text, file=file or sys.stdout, flush=True)


def note(text: str) -> None:
    """A line of commentary (not part of the terminal transcript)."""
    say(f"--- {text}")


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


def first_part(e: BaseException) -> str:
    """A GuestError's message without the console tail it carries (we print our own)."""
    text = str(e) or type(e).__name__
    return text.split("\n--- guest console", 1)[0].rstrip()


def _pdeathsig_term() -> None:
    """In the daemon child: get SIGTERM if the demo dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------------------------
# the daemon


class Daemon:
    """vfsd (or the ``$VFSD_DEMO_DAEMON`` stand-in) as a child process, logging to a file.

    It runs in its own session so that Ctrl-C reaches only the demo, which then stops it in
    order (after the guest): SIGTERM, then SIGKILL if it does not exit.
    """

    def __init__(self, workdir: Path, export: Path, workers: int) -> None:
        self.socket_path = workdir / "vfsd.sock"
        self.log_path = workdir / "vfsd.log"
        override = os.environ.get("VFSD_DEMO_DAEMON", "").strip()
        if override:
            self.name = Path(shlex.split(override)[0]).name
            self.argv = [*shlex.split(override), f"--socket-path={self.socket_path}",
                         "-o", f"source={export}"]
        else:
            self.name = "vfsd"
            self.argv = [sys.executable, "-m", "vfsd", "--socket-path", str(self.socket_path),
                         "--shared-dir", str(export), "--workers", str(workers)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped_by_us = False

    @property
    def shown_cmd(self) -> str:
        argv = list(self.argv)
        if argv[:3] == [sys.executable, "-m", "vfsd"]:
            argv[:3] = ["python", "-m", "vfsd"]
        return shlex.join(argv)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # stale, from an earlier run (we hold the demo lock)
        with open(self.log_path, "wb") as log:
            log.write(f"=== {time.strftime('%F %T')} {shlex.join(self.argv)}\n".encode())
            log.flush()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                              env.get("PYTHONPATH")]))
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=REPO, env=env, start_new_session=True, preexec_fn=_pdeathsig_term,
                )
            except OSError as e:
                raise DemoError(f"cannot start {self.name}: {e}") from e
        deadline = time.monotonic() + SOCKET_WAIT
        while True:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                    return
            if self.proc.poll() is not None:
                raise DemoError(
                    f"{self.name} exited early (rc={self.proc.returncode}) before creating its"
                    f" socket {self.socket_path}.\n{self.log_excerpt()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{self.name} did not create its socket {self.socket_path} within"
                    f" {SOCKET_WAIT:g} s.\n{self.log_excerpt()}"
                )
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def rc(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_excerpt(self) -> str:
        return f"--- last {LOG_TAIL} lines of {self.log_path} ---\n{tail(self.log_path)}"

    def served_line(self) -> str | None:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            if SERVED_MARK in line:
                return SERVED_MARK + line.split(SERVED_MARK, 1)[1]
        return None

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, grace: float = 3.0, term_wait: float = 15.0) -> None:
        """Let it exit on its own for ``grace`` s (it does once QEMU disconnects), then
        SIGTERM, then SIGKILL; finally SIGKILL anything left in its process group (its
        session is its own, so that is only its own helpers, e.g. orphaned workers)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.stopped_by_us = True
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(term_wait)
                except subprocess.TimeoutExpired:
                    say(f"{self.name} ignored SIGTERM for {term_wait:g} s; killing it",
                        file=sys.stderr)
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.killpg(proc.pid, 0)
            except OSError:
                return  # the group is empty
            if time.monotonic() > deadline:
                say(f"killing processes {self.name} left behind (process group {proc.pid})",
                    file=sys.stderr)
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.05)


class Watchdog(threading.Thread):
    """While armed: if the daemon dies, kill QEMU so a guest command blocked on the share
    fails at once (instead of hanging until its timeout), and remember why."""

    def __init__(self, daemon: Daemon, guest: Guest) -> None:
        super().__init__(name="vfsd-demo-watchdog", daemon=True)
        self.d = daemon
        self.guest = guest
        self.armed = threading.Event()
        self.fired = threading.Event()
        self._quit = threading.Event()

    def run(self) -> None:
        while not self._quit.wait(0.2):
            if self.armed.is_set() and not self.d.alive:
                self.fired.set()
                pid = self.guest.pid
                if pid is not None and self.guest.alive:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                return

    def stop(self) -> None:
        self.armed.clear()
        self._quit.set()


# --------------------------------------------------------------------------------------------
# the guest side


def transcript_cmd(guest: Guest, cmd: str, timeout: float = CMD_TIMEOUT) -> tuple[int, str]:
    """Run ``cmd`` in the guest and print it the way a terminal would show it."""
    say(f"guest# {cmd}")
    rc, out = guest.run(cmd, timeout)
    if out:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
    if rc != 0:
        say(f"[exit {rc}]")
    sys.stdout.flush()
    return rc, out


def run_transcript(guest: Guest, export: Path, keep_mounted: bool, problems: list[str]) -> None:
    say()
    transcript_cmd(guest, "mount | grep virtiofs")
    transcript_cmd(guest, f"ls -la {MNT}")
    if (export / "README.txt").is_file():
        transcript_cmd(guest, f"cat {MNT}/README.txt")
    rc, _ = transcript_cmd(
        guest, f'echo "hello from the guest (kernel $(uname -r))" > {MNT}/from-guest.txt'
    )
    if rc != 0:
        problems.append("writing from-guest.txt in the guest failed")
    host_file = export / "from-guest.txt"
    say(f"host$ cat {shlex.quote(str(host_file))}")
    try:
        content = host_file.read_text(errors="replace")
        sys.stdout.write(content if content.endswith("\n") else content + "\n")
        if not content.startswith("hello from the guest"):
            problems.append(f"{host_file} does not hold what the guest wrote")
    except OSError as e:
        say(f"cat: {e.strerror or e}")
        problems.append(f"the guest's file is not visible on the host ({host_file})")
    transcript_cmd(guest, f"df -h {MNT}")
    blob = f"{MNT}/{FIO_FILE}"
    fio = f"fio --filename={blob} --bs=1M --size=64M"
    rc, _ = transcript_cmd(
        guest, f"{fio} --name=write --rw=write --end_fsync=1 2>&1 | grep -E 'WRITE:|error'"
    )
    if rc == 0:
        transcript_cmd(
            guest,
            "echo 3 > /proc/sys/vm/drop_caches; "
            f"{fio} --name=read --rw=read 2>&1 | grep -E 'READ:|error'",
        )
    transcript_cmd(guest, f"rm -f {blob}")
    if not keep_mounted:
        rc, _ = transcript_cmd(guest, f"umount {MNT}")
        if rc != 0:
            problems.append(f"umount {MNT} failed in the guest")
    say()


def _shell_script(line: str, cwd: str, marker: str) -> str:
    """Each guest command is a fresh ``sh`` started in /; carry the directory across."""
    return (
        f"cd {shlex.quote(cwd)} 2>/dev/null || cd /\n"
        f"{line}\n"
        "__vfsd_demo_rc=$?\n"
        f"printf '\\n{marker}%s\\n' \"$PWD\"\n"
        "exit $__vfsd_demo_rc\n"
    )


def run_shell(guest: Guest) -> None:
    """Read command lines from stdin and run each in the guest until exit/EOF."""
    tty = sys.stdin.isatty()
    if tty:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    say(f"Guest shell: each line runs with sh in the guest (as root; starts in {MNT}, `cd`"
        " carries over;")
    say("no stdin, so no interactive programs). `exit` or Ctrl-D leaves; Ctrl-C stops the"
        " demo.")
    cwd = MNT
    marker = f"@@VFSD_DEMO_CWD_{secrets.token_hex(4)}@@"
    while True:
        if tty:
            try:
                line = input("guest# ")
            except EOFError:
                say()
                break
        else:
            raw = sys.stdin.readline()
            if not raw:
                break
            line = raw.rstrip("\n")
            say(f"guest# {line}")
        line = line.strip()
        if not line:
            continue
        if line.split()[0] in ("exit", "logout", "quit"):
            break
        try:
            rc, out = guest.run(_shell_script(line, cwd, marker), SHELL_TIMEOUT)
        except GuestTimeout as e:
            say(f"[timed out after {SHELL_TIMEOUT:g} s: {first_part(e).splitlines()[0]}]")
            if not guest.healthy:
                raise
            continue
        cut = out.rfind(f"\n{marker}")
        if cut >= 0:
            cwd = out[cut + 1 + len(marker) :].strip() or cwd
            out = out[:cut]
        if out:
            sys.stdout.write(out if out.endswith("\n") else out + "\n")
        if rc != 0:
            say(f"[exit {rc}]")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# the demo


def prepare_export(export: Path, default: bool) -> None:
    export.mkdir(parents=True, exist_ok=True)
    readme = export / "README.txt"
    empty = not any(export.iterdir())
    if empty or (default and not readme.exists()):
        readme.write_text(README_TEXT.format(export=export, mnt=MNT, tag=TAG,
                                             when=time.strftime("%F %T")))
        note(f"wrote {readme}")


def qemu_hint(socket_path: Path, no_kvm: str | None) -> str:
    """QEMU options for the operator's own VM; `no_kvm` says why KVM does not work here."""
    sock = shlex.quote(str(socket_path))
    accel = "-accel tcg -cpu max" if no_kvm else "-accel kvm -cpu host"
    lines = [
        f"qemu-system-x86_64 {accel} -m 2G \\",
        "    -object memory-backend-memfd,id=mem,size=2G,share=on -numa node,memdev=mem \\",
        f"    -chardev socket,id=vfs,path={sock} \\",
        f"    -device vhost-user-fs-pci,chardev=vfs,tag={TAG} \\",
        "    -drive if=virtio,file=YOUR-DISK.qcow2   # plus your usual options",
        "",
        "guest# mkdir -p /mnt/vfs && mount -t virtiofs vfs /mnt/vfs",
        "",
        "(-m and the memfd size must match: share=on guest RAM is what lets vfsd read and",
        " write the guest's buffers. One VM per socket; vfsd exits when that VM disconnects.)",
    ]
    if no_kvm:
        lines += ["", f"(TCG because KVM does not work here: {no_kvm}.",
                  " Where it does, use -accel kvm -cpu host.)"]
    return "\n".join(lines)


def lock_workdir(workdir: Path) -> IO[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    f = open(workdir / "demo.lock", "w")  # noqa: SIM115 (held for the life of the demo)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise DemoError(f"another demo is running (it holds {workdir}/demo.lock)") from None
    return f


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="deploy/demo.sh",
        description="Run vfsd on a directory and boot a real Linux guest that mounts it"
                    f" (virtiofs at {MNT}), showing it working.",
        epilog=f"Files: {WORKDIR}/ holds the socket, vfsd.log, and the guest's console and"
               " QEMU logs. The demo writes from-guest.txt into the export (and removes its"
               " temporary fio file). Accelerator: $VFSD_ACCEL=auto|kvm|tcg (see"
               " tests/rig/README.md).",
    )
    ap.add_argument("--export", metavar="DIR", type=Path,
                    help=f"directory to share (default {DEFAULT_EXPORT}; created, with a"
                         " README.txt, if missing or empty)")
    ap.add_argument("--workers", metavar="N", type=int, default=2,
                    help="vfsd worker processes (default 2)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--shell", action="store_true",
                      help="after the transcript, read commands from stdin and run them in the"
                           " guest (exit or EOF ends)")
    mode.add_argument("--no-guest", action="store_true",
                      help="only run vfsd and print the QEMU options to attach your own VM;"
                           " waits until vfsd exits (Ctrl-C stops it)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    return args


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.export: Path = (args.export or DEFAULT_EXPORT).resolve()
        self.daemon = Daemon(WORKDIR, self.export, args.workers)
        self.guest: Guest | None = None
        self.watchdog: Watchdog | None = None
        self.mounted = False
        self.problems: list[str] = []
        self.failed = False
        self.interrupted: str | None = None

    # ------------------------------------------------------------------ main flow

    def run(self) -> int:
        try:
            self.daemon_up()
            if self.args.no_guest:
                self.serve_only()
            else:
                self.with_guest()
        except KeyboardInterrupt as e:
            self.interrupted = str(e) if isinstance(e, Interrupted) else "Ctrl-C"
            say()
            note(f"interrupted ({self.interrupted}); cleaning up")
        except DemoError as e:
            self.failed = True
            say(f"\nERROR: {e}", file=sys.stderr)
        except GuestError as e:
            self.failed = True
            self.explain_guest_error(e)
        finally:
            self.cleanup()
        self.summary()
        if self.interrupted:
            return 130
        return 1 if self.failed or self.problems else 0

    def daemon_up(self) -> None:
        try:
            prepare_export(self.export, default=self.args.export is None)
        except OSError as e:
            raise DemoError(f"cannot prepare the export {self.export}: {e}") from e
        say(f"host$ {self.daemon.shown_cmd} &")
        self.daemon.start()
        note(f"{self.daemon.name} is listening on {self.daemon.socket_path}"
             f" (pid {self.daemon.proc.pid if self.daemon.proc else '?'},"
             f" log {self.daemon.log_path})")

    def serve_only(self) -> None:
        say("\nAttach a VM of your own, for example:\n")
        say(qemu_hint(self.daemon.socket_path, kvm_failure()))
        say()
        note(f"waiting for {self.daemon.name} to exit (Ctrl-C stops it)")
        rc = self.daemon.wait()
        note(f"{self.daemon.name} exited (rc={rc})")
        if rc != 0:
            self.failed = True
            say(self.daemon.log_excerpt(), file=sys.stderr)

    def with_guest(self) -> None:
        if not qemu_binary():
            raise DemoError("qemu-system-x86_64 not found (bash deploy/bootstrap.sh installs it)")
        with contextlib.suppress(FileNotFoundError):
            (WORKDIR / f"{GUEST_NAME}-qemu.log").unlink()  # one run per log
        self.guest = Guest(WORKDIR, vhost_user_socket=self.daemon.socket_path, tag=TAG,
                           name=GUEST_NAME, socket_wait=SOCKET_WAIT)
        self.watchdog = Watchdog(self.daemon, self.guest)
        self.watchdog.start()
        self.watchdog.armed.set()
        note("booting the guest (QEMU; the first run on a host may spend ~6 s probing KVM)")
        self.guest.start()  # what boot_guest() does, but we keep the object for cleanup
        note("guest is up; mounting the share")
        say(f"guest# mkdir -p {MNT} && mount -t virtiofs {TAG} {MNT}")
        try:
            self.guest.mount_share(MNT)
        except GuestError as e:
            self.explain_guest_error(e, what=f"mounting the share at {MNT} failed")
            self.failed = True
            return
        self.mounted = True
        run_transcript(self.guest, self.export, keep_mounted=self.args.shell,
                       problems=self.problems)
        self.mounted = self.args.shell
        if self.args.shell:
            run_shell(self.guest)
        self.check_daemon_alive()

    def check_daemon_alive(self) -> None:
        if not self.daemon.alive:
            raise DemoError(f"{self.daemon.name} exited unexpectedly (rc={self.daemon.rc})"
                            f" while the guest was running.\n{self.daemon.log_excerpt()}")

    # ------------------------------------------------------------------ failure reports

    def explain_guest_error(self, e: GuestError, what: str = "the guest failed") -> None:
        self.failed = True
        err = sys.stderr
        if (self.watchdog is not None and self.watchdog.fired.is_set()) or not self.daemon.alive:
            say(f"\nERROR: {self.daemon.name} exited unexpectedly (rc={self.daemon.rc}), so"
                " the guest was stopped.", file=err)
            say(f"(guest side: {first_part(e).splitlines()[0]})", file=err)
        else:
            say(f"\nERROR: {what}:\n{first_part(e)}", file=err)
            if self.guest is not None:
                say(f"--- last 20 lines of the guest console ({self.guest.console_path}) ---\n"
                    f"{self.guest.console_tail(20)}", file=err)
        say(self.daemon.log_excerpt(), file=err)

    # ------------------------------------------------------------------ teardown

    def cleanup(self) -> None:
        """Unmount, power off, stop the daemon: each step bounded, each step attempted.

        Another Ctrl-C (or SIGTERM) meanwhile skips the graceful steps; QEMU and the daemon
        are stopped regardless (and both also die with the demo: PDEATHSIG).
        """
        if self.watchdog is not None:
            self.watchdog.stop()
        g = self.guest
        try:
            if g is not None:
                if self.mounted and g.alive and g.healthy:
                    say(f"guest# umount {MNT}")
                    try:
                        rc, out = g.run(f"umount {MNT}", timeout=10)
                        if out:
                            sys.stdout.write(out if out.endswith("\n") else out + "\n")
                        if rc != 0:
                            say(f"[exit {rc}]")
                    except GuestError as e:
                        if g.alive:
                            say(f"(umount: {first_part(e).splitlines()[0]})", file=sys.stderr)
                        else:
                            note("QEMU has already stopped (Ctrl-C reaches it too)")
                self.mounted = False
                if g.alive:
                    note("powering off the guest")
                g.close()
        except KeyboardInterrupt as e:
            self.interrupted = self.interrupted or (str(e) or "Ctrl-C")
            note("interrupted again: killing QEMU and the daemon")
        finally:
            if g is not None and g.alive and g.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(g.pid, signal.SIGKILL)  # the Guest's finalizer reaps it
        if g is not None:
            with contextlib.suppress(OSError):
                (self.export / FIO_FILE).unlink()  # if the transcript was cut short
        # The last step must not be cut short: hold further signals until the daemon is gone.
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            grace = 3.0 if g is not None else 0.0
            if self.daemon.alive:
                note(f"waiting for {self.daemon.name} to exit (SIGTERM after {grace:g} s)"
                     if grace else f"stopping {self.daemon.name} (SIGTERM)")
            self.daemon.stop(grace=grace)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def summary(self) -> None:
        say("\n== summary ==")
        if self.guest is not None and self.guest.boot_seconds is not None:
            say(f"guest boot:    {self.guest.boot_seconds:.1f} s"
                f" (accel {self.guest.accel}, {self.guest.smp} vCPUs, {self.guest.mem})")
        elif self.guest is not None:
            say("guest boot:    did not complete")
        d = self.daemon
        if d.proc is not None:
            how = " after SIGTERM" if d.stopped_by_us else ""
            say(f"daemon:        {d.name}, exported {self.export}, exited rc={d.rc}{how}")
        served = d.served_line()
        if served:
            say(f"vfsd:          {served}")
        elif d.proc is not None and d.name == "vfsd":
            say(f"vfsd:          (no '{SERVED_MARK}' line in its log)")
        for p in self.problems:
            say(f"problem:       {p}")
        say("logs:")
        say(f"  {d.name + ' log:':<16}{d.log_path}")
        if self.guest is not None:
            say(f"  {'guest console:':<16}{self.guest.console_path}")
            say(f"  {'QEMU log:':<16}{self.guest.qemu_log_path}")
        if self.interrupted:
            say(f"result:        interrupted ({self.interrupted})")
        elif self.failed or self.problems:
            say("result:        FAILED (see above)")
        else:
            say("result:        OK")
            self.next_steps()

    def next_steps(self) -> None:
        say("next:")
        if not self.args.shell:
            say("  bash deploy/demo.sh --shell     type commands in the guest, on the share")
        if not self.args.no_guest:
            say("  bash deploy/demo.sh --no-guest  vfsd only, for a VM of your own (prints the"
                " QEMU options)")
        say("  README.md, 'Running it for a VM': vfsd for a real VM (QEMU, systemd, libvirt)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    try:
        lock = lock_workdir(WORKDIR)
    except DemoError as e:
        say(f"ERROR: {e}", file=sys.stderr)
        return 1
    try:
        return Demo(args).run()
    finally:
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
