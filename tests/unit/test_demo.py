"""The demo and its set-up as a new user meets them: help before any set-up, quiet set-up
with errors kept visible, a summary that ends with the next step, and a KVM probe that
says why it failed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.rig import demo, qemu
from tests.rig.build import GuestImage

REPO = Path(__file__).resolve().parents[2]


def copy_repo(dest: Path, *paths: str) -> Path:
    for rel in paths:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_demo_help_comes_before_any_set_up(tmp_path):
    """A fresh clone: no .venv; a bootstrap that ran would leave a mark (and fail)."""
    copy_repo(tmp_path, "deploy/demo.sh", "tests/rig")
    mark = tmp_path / "bootstrap-ran"
    (tmp_path / "deploy" / "bootstrap.sh").write_text(f"touch {mark}; exit 1\n")
    t0 = time.monotonic()
    run = subprocess.run(["bash", "deploy/demo.sh", "--workers", "2", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: deploy/demo.sh") and "--no-guest" in run.stdout
    assert not mark.exists() and not (tmp_path / ".venv").exists()
    assert time.monotonic() - t0 < 10


@pytest.fixture
def setup_repo(tmp_path):
    """bootstrap.sh in a copy with .venv already made, and fake dpkg-query/apt-get on PATH:
    `missing` lists packages dpkg-query reports absent; apt-get chatters, then exits with
    the code in apt-rc."""
    repo = copy_repo(tmp_path / "repo", "deploy/bootstrap.sh", "tests/rig/deps.sh",
                     "tests/rig/setup-log.sh", "pyproject.toml")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(shutil.which("python3"))
    (repo / ".venv" / ".vfsd-installed").touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "missing").write_text("")
    (tmp_path / "apt-rc").write_text("0")
    scripts = {
        "dpkg-query": 'for pkg; do :; done\n'  # the last argument
                      f'grep -qx "$pkg" {tmp_path}/missing && exit 1\n'
                      'printf "install ok installed"\n',
        "apt-get": "echo 'Selecting previously unselected package fio.'\n"
                   "echo 'debconf: delaying package configuration' >&2\n"
                   f'[ "$(cat {tmp_path}/apt-rc)" = 0 ] || echo "E: Unable to fetch fio" >&2\n'
                   f"exit $(cat {tmp_path}/apt-rc)\n",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        env.pop("VFSD_SETUP_LOG", None)
        return subprocess.run(["bash", "deploy/bootstrap.sh", *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=60)

    run.tmp = tmp_path  # type: ignore[attr-defined]
    return run


@pytest.mark.skipif(os.geteuid() != 0, reason="deps.sh installs only as root")
def test_setup_is_silent_when_done_and_quiet_but_visible_when_apt_fails(setup_repo):
    run = setup_repo("--quiet")
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    assert setup_repo().stdout == "deps.sh: all rig packages present\n"
    (setup_repo.tmp / "missing").write_text("fio\n")
    run = setup_repo("--quiet")
    assert run.returncode == 0, run.stderr
    assert "deps.sh: installing fio" in run.stdout
    assert "Selecting previously" not in run.stdout + run.stderr  # in .cache/setup.log
    assert "debconf" not in run.stdout + run.stderr
    (setup_repo.tmp / "apt-rc").write_text("100")
    run = setup_repo("--quiet")
    assert run.returncode != 0
    assert "FAILED: apt-get update -qq" in run.stderr and "E: Unable to fetch fio" in run.stderr


def summary_of(capsys, argv: list[str], failed: bool = False) -> str:
    d = demo.Demo(demo.parse_args(argv))
    d.failed = failed
    d.summary()
    return capsys.readouterr().out


def test_demo_summary_ends_with_the_next_step(capsys):
    out = summary_of(capsys, [])
    assert out.rstrip().splitlines()[-4:] == [
        "next:",
        "  bash deploy/demo.sh --shell     type commands in the guest, on the share",
        "  bash deploy/demo.sh --no-guest  vfsd only, for a VM of your own (prints the QEMU"
        " options)",
        "  README.md, 'Running it for a VM': vfsd for a real VM (QEMU, systemd, libvirt)"]
    assert "--shell " not in summary_of(capsys, ["--shell"])
    assert "next:" not in summary_of(capsys, [], failed=True)


FAKE_QEMU = """#!/bin/sh
echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0" >&2
echo "qemu-system-x86_64: kvm_buf_set_msrs: Assertion 'ret == nmsrs' failed." >&2
kill -ABRT $$
"""


def test_kvm_probe_shows_qemus_last_words_and_keeps_its_logs(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(FAKE_QEMU)
    fake.chmod(0o755)
    monkeypatch.setenv("VFSD_QEMU", str(fake))
    monkeypatch.setenv("VFSD_GUEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(qemu, "_accel_verdict", None)
    monkeypatch.setattr(qemu, "_kvm_usable", lambda: True)
    image = GuestImage(tmp_path / "k", tmp_path / "i", tmp_path / "k", "6.1", (), "key", tmp_path)
    assert qemu.kvm_failure() is None  # not probed yet
    assert qemu.probe_kvm(image) == "tcg"
    err = capsys.readouterr().err
    assert "KVM probe failed (kvm-probe: QEMU exited (rc=-6)" in err
    assert "  qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0\n" in err
    assert "kvm_buf_set_msrs: Assertion 'ret == nmsrs' failed." in err
    kept = Path(err.split("(probe logs kept in ")[1].split(")")[0])
    assert "failed to set MSR" in (kept / "kvm-probe-qemu.log").read_text()
    # The verdict's reason reaches the --no-guest advice, which then does not offer KVM.
    reason = qemu.kvm_failure()
    assert reason is not None and "rc=-6" in reason and "kvm_buf_set_msrs" in reason
    hint = demo.qemu_hint(Path("/s.sock"), reason)
    assert hint.startswith("qemu-system-x86_64 -accel tcg -cpu max ") and reason in hint
    assert demo.qemu_hint(Path("/s.sock"), None).startswith("qemu-system-x86_64 -accel kvm")
