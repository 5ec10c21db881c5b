"""The command line an operator meets: help for every flag and command, `check-config`'s
report, and the host checks start-up shares with it."""

import argparse
import logging
import os
import subprocess

import pytest

from vfsd import cli, config, hostcheck
from vfsd.affinity import format_cpulist


def test_every_serve_flag_has_help_and_commands_are_listed(capsys):
    for action in cli.serve_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, command in cli.COMMANDS.items():
        assert f"  {name} {command.args}" in out and command.summary in out, name
    for flag in ("--sandbox", "--seccomp", "--modcaps", "--uid-map", "--gid-map"):
        assert "not implemented yet" in cli.serve_parser()._option_string_actions[flag].help


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"usage: vfsd {name}") and not out.err


def test_check_config_counts_what_the_file_sets(tmp_path, capsys):
    f = tmp_path / "one.yaml"
    f.write_text(f"shared_dir: {tmp_path}\n")
    assert cli.main(["check-config", str(f)]) == 0
    others = len(config.SETTINGS) - 1
    assert capsys.readouterr().out == f"{f}: OK (1 setting set; the other {others} at their " \
                                      "defaults)\n"


def test_check_config_reports_every_error(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text('wrokers: 2\nreadonly: "false"\nworkers: "4"\nlog_level: loud\n')
    assert cli.main(["check-config", str(f)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[0] for line in err] == [f"{f}:{n}" for n in (1, 2, 3, 4)] + [str(f)]
    assert err[0].endswith("(did you mean 'workers'?)")
    assert err[-1] == f"{f}: 4 errors"


@pytest.fixture
def logging_restored():
    """cli.main sets up the root logger for a daemon; give pytest's back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_host_dependent_settings_warn_in_check_config_and_fail_start_up(tmp_path, capsys,
                                                                         logging_restored):
    beyond = max(os.sched_getaffinity(0)) + 1
    f = tmp_path / "v.yaml"
    f.write_text(f"log_level: warn\nshared_dir: {tmp_path}/nonexistent\n"
                 f"supervisor_cpus: 0-{beyond + 97}\nsocket_path: {tmp_path}/s.sock\n")
    assert cli.main(["check-config", str(f)]) == 0  # the host that runs it may differ
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"{f}:2: warning: shared_dir: {tmp_path}/nonexistent does not exist",
        f"{f}:3: warning: supervisor_cpus: CPU(s) {beyond}-{beyond + 97} not available "
        f"(allowed: {format_cpulist(frozenset(os.sched_getaffinity(0)))})"]
    assert "OK (4 settings set, 2 warnings for this host;" in out.out
    assert cli.main(["--config", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"vfsd: shared_dir: {tmp_path}/nonexistent does not exist\n" in err
    assert f"vfsd: supervisor_cpus: CPU(s) {beyond}-{beyond + 97} not available" in err
    assert not os.path.exists(tmp_path / "s.sock")


def test_host_problems(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    s = config.Settings(shared_dir=str(tmp_path / "file"), socket_group="no-such-group-here",
                        rlimit_nofile=1 << 40, worker_cpus="0")
    assert hostcheck.problems(s) == [
        ("shared_dir", f"{tmp_path}/file is not a directory"),
        ("socket_group", "no group 'no-such-group-here'"),
        ("rlimit_nofile", f"above this host's fs.nr_open ({hostcheck._nr_open()})")]
    assert hostcheck.problems(config.Settings(shared_dir=str(tmp_path), socket_group="0")) == []


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs with the given options (root only)."""
    mounted = []

    def mount(name: str, options: str):
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,{options}", "tmpfs", path],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        mounted.append(path)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", path], check=True)


def test_device_node_risk_unless_nodev_or_hardened(tmpfs):
    dev, nodev = tmpfs("dev", "dev"), tmpfs("nodev", "nodev")
    risk = hostcheck.device_node_risk(config.Settings(shared_dir=dev))
    assert risk is not None and dev in risk and "not on a nodev mount" in risk
    assert hostcheck.device_node_risk(config.Settings(shared_dir=nodev)) is None
    for mode in ("whiteouts", "none"):
        assert hostcheck.device_node_risk(config.Settings(shared_dir=dev,
                                                          allow_devices=mode)) is None
