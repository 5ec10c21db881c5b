"""Settings: defaults, YAML validation with file/line/key in errors, CLI precedence."""

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from vfsd import cli, config

REPO = Path(__file__).resolve().parents[2]


def test_declarations_match_settings_dataclass():
    fields = {f.name: f.default for f in dataclasses.fields(config.Settings)}
    assert fields == {s.key: s.default for s in config.SETTINGS}


def test_shipped_yaml_documents_every_setting():
    text = (REPO / "config" / "vfsd.yaml").read_text()
    for s in config.SETTINGS:
        assert f"{s.key}:" in text, s.key
    values = config.load_yaml(str(REPO / "config" / "vfsd.yaml"))
    settings = config.build(values, {})
    for key, value in values.items():
        if key not in ("shared_dir", "socket_path"):
            assert value == config.BY_KEY[key].default, key
    assert settings.cache == "auto"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers: 1\nbogus: 2\n", "f.yaml:2: unknown setting 'bogus'"),
        ("cache: sometimes\n", "f.yaml:1: cache: must be one of never, auto, metadata, always"),
        ("workers: many\n", "f.yaml:1: workers: expected int, got 'many'"),
        ("workers: 999\n", "f.yaml:1: workers: must be between 0 and 255"),
        ("xattr: 3\n", "f.yaml:1: xattr: expected bool"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("cache: auto\ncache: never\n", "f.yaml:2: cache: set twice"),
        ("workers: [1\n", "invalid YAML"),
        # Found by fuzzing (tests/fuzz/fuzz_config_yaml.py); each used to escape as another
        # exception (or, for the alias bomb, to run out of memory building the message).
        ("? [a, b]\n: 1\n", "f.yaml:1: a key must be a setting name, not a sequence"),
        ("workers: !!int abc\n", "f.yaml:1: YAML tags such as 'tag:yaml.org,2002:int' are"),
        ("workers: !!int ''\n", "f.yaml:1: YAML tags such as"),
        ("readonly: !!bool x\n", "f.yaml:1: YAML tags such as"),
        ("workers: !!python/object:os.system x\n", "f.yaml:1: YAML tags such as"),
        ("cache: !custom [a]\n", "f.yaml:1: YAML tags such as '!custom'"),
        ("workers: " + "9" * 5000 + "\n", "f.yaml:1: workers: invalid value: Exceeds"),
        ("log_level: 2024-13-01\n", "f.yaml:1: log_level: invalid value: month must be"),
        ("translate_uid: {<<: 1}\n", "f.yaml:1: translate_uid: invalid value: while"),
        ("workers: " + "[" * 5000 + "]" * 5000 + "\n", "f.yaml:1: nested deeper than 32"),
        ("workers: '\u00b2'\n", "f.yaml:1: workers: expected int, got '\u00b2'"),
        ("shared_dir: ''\n", "f.yaml:1: shared_dir: must not be empty"),
    ],
)
def test_yaml_errors_name_file_line_key(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    Path("f.yaml").write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load_yaml("f.yaml")
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('readonly: "yes"\n', "f.yaml:1: readonly: expected bool, got 'yes': a quoted value is a"
                              " string in YAML; write true without quotes"),
        ('readonly: "false"\n', "readonly: expected bool, got 'false': a quoted value is a string"
                                " in YAML; write false without quotes"),
        ("readonly: 'on'\n", "readonly: expected bool, got 'on'"),
        ('workers: "4"\n', "f.yaml:1: workers: expected int, got '4': a quoted value is a string"
                           " in YAML; write 4 without quotes"),
        ('allow_devices: "false"\n', "allow_devices: must be one of all, whiteouts, none (or true,"
                                     " false), got 'false': a quoted value is a string in YAML;"
                                     " write false without quotes"),
        ("workers:\n", "f.yaml:1: workers: no value (leave the key out for the default, 0)"),
    ],
)
def test_quoted_strings_are_not_other_types(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    Path("f.yaml").write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load_yaml("f.yaml")
    assert message in str(e.value)


def test_unquoted_yaml_booleans_and_numbers_are_fine(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("readonly: yes\nxattr: on\nflock: false\nworkers: 4\nshared_dir:\n")
    assert config.load_yaml(str(f)) == {"readonly": True, "xattr": True, "flock": False,
                                        "workers": 4, "shared_dir": None}


def test_every_error_in_a_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("f.yaml").write_text("wrokers: 2\ncache: metadatas\nxattr: true\n"
                              "inode_capacity: 5\nxattr: false\nzzzz: 1\n")
    with pytest.raises(config.ConfigError) as e:
        config.load_yaml("f.yaml")
    assert e.value.problems == (
        "f.yaml:1: unknown setting 'wrokers' (did you mean 'workers'?)",
        "f.yaml:2: cache: must be one of never, auto, metadata, always, got 'metadatas' (did "
        "you mean 'metadata'?)",
        "f.yaml:4: inode_capacity: must be between 1024 and 4294967294",
        "f.yaml:5: xattr: set twice (first on line 3)",
        "f.yaml:6: unknown setting 'zzzz'",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("inode_capacity: 5\n", "inode_capacity: must be between 1024 and 4294967294"),
        ("num_queues: 256\n", "num_queues: must be between 1 and 255"),
        ("num_queues: 0\n", "num_queues: must be between 1 and 255"),
        ("socket_fd: -1\n", "socket_fd: must be between 0 and"),
        ("rlimit_nofile: 0\n", "rlimit_nofile: must be > 0"),
    ],
)
def test_bounds_are_checked_on_any_host(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    Path("f.yaml").write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load_yaml("f.yaml")


@pytest.mark.parametrize(("word", "level"), [
    ("trace", "debug"), ("debug", "debug"), ("info", "info"), ("warn", "warning"),
    ("warning", "warning"), ("err", "error"), ("error", "error"), ("off", "error")])
def test_one_log_level_vocabulary_for_yaml_flag_and_o(tmp_path, word, level):
    f = tmp_path / "f.yaml"
    f.write_text(f"log_level: {word}\n")
    assert cli.settings_from_args(["--config", str(f)]).log_level == level
    assert cli.settings_from_args(["--log-level", word]).log_level == level
    assert cli.settings_from_args(["-o", f"log_level={word}"]).log_level == level


def test_a_bad_log_level_is_the_same_error_everywhere(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("log_level: loud\n")
    expected = "log_level: must be one of debug, info, warning, error, trace, warn, err, off"
    for argv in (["--config", str(f)], ["--log-level", "loud"], ["-o", "log_level=loud"]):
        with pytest.raises(config.ConfigError, match=expected):
            cli.settings_from_args(argv)


def test_allow_devices_modes_and_spellings(tmp_path):
    assert config.Settings().allow_devices == "all"  # as virtiofsd
    f = tmp_path / "f.yaml"
    for text, mode in (("true", "all"), ("false", "none"), ("whiteouts", "whiteouts"),
                       ("none", "none"), ("all", "all")):
        f.write_text(f"allow_devices: {text}\n")
        assert config.load_yaml(str(f)) == {"allow_devices": mode}, text
    for argv, mode in ((["--allow-devices"], "all"), (["--no-allow-devices"], "none"),
                       (["--allow-devices", "whiteouts"], "whiteouts"),
                       (["-o", "allow_devices"], "all"), (["-o", "no_allow_devices"], "none"),
                       (["-o", "allow_devices=whiteouts"], "whiteouts"),
                       (["-o", "allow_devices=false"], "none")):
        assert cli.settings_from_args(argv).allow_devices == mode, argv
    with pytest.raises(config.ConfigError, match="allow_devices: must be one of"):
        cli.settings_from_args(["-o", "allow_devices=some"])


def test_unknown_o_option_suggests_the_nearest(capsys):
    with pytest.raises(config.ConfigError, match=r"-o wrokers=2: unknown option \(did you mean "
                                                 r"'workers'\?\)"):
        cli.settings_from_args(["-o", "wrokers=2"])


def test_alias_bomb_fails_with_a_short_message(tmp_path, monkeypatch):
    # Found by fuzzing: 9 aliases per level share one list, so the value is small in memory
    # but its repr grows 9x per level. At 12 levels the message never finished; at 7 it was
    # 24 MB.
    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [
        f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 7)]
    monkeypatch.chdir(tmp_path)
    Path("f.yaml").write_text(f"translate_uid: [{', '.join(levels)}]\n")
    with pytest.raises(config.ConfigError, match="expected a string or a list of strings") as e:
        config.load_yaml("f.yaml")
    assert len(str(e.value)) < 1000


def test_non_utf8_file_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("f.yaml").write_bytes(b"-\xdb- \n")  # found by fuzzing: was UnicodeDecodeError
    with pytest.raises(config.ConfigError, match=r"f\.yaml: not UTF-8 text"):
        config.load_yaml("f.yaml")


@pytest.mark.parametrize("value", ["--5", "\u00b2", "1" * 5000])
def test_int_strings_from_the_command_line(value):
    # Found by fuzzing: these passed `lstrip("-").isdigit()` and then failed in int().
    with pytest.raises(config.ConfigError, match="workers: expected int"):
        config.from_text("workers", value)
    assert config.from_text("workers", "-0") == 0


def test_cli_overrides_yaml_and_o_options(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump({"shared_dir": "/from/yaml", "workers": 2, "cache": "never"}))
    s = cli.settings_from_args(["--config", str(f), "--workers", "3"])
    assert (s.shared_dir, s.workers, s.cache) == ("/from/yaml", 3, "never")
    s = cli.settings_from_args(["--config", str(f), "-o", "source=/o,cache=always,xattr",
                                "--thread-pool-size", "4"])
    assert (s.shared_dir, s.cache, s.xattr, s.workers) == ("/o", "always", True, 4)
    with pytest.raises(config.ConfigError, match="unknown option"):
        cli.settings_from_args(["-o", "frobnicate"])


def test_check_config_command(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("shared_dir: /x\nworkers: 2\n")
    assert cli.main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: 2\nlog_level: loud\n")
    assert cli.main(["check-config", str(bad)]) == 1
    assert "bad.yaml:2: log_level: must be one of" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("xattrmap: ':frob:all:::'\n", "f.yaml:1: xattrmap: invalid mapping: rule 1: unknown type"),
        ("translate_uid: [map:1:2]\n", "f.yaml:1: translate_uid: invalid translation: map:1:2:"),
        ("translate_gid: 5\n", "f.yaml:1: translate_gid: expected a string or a list"),
        ("inode_file_handles: always\n", "inode_file_handles: must be one of never, prefer"),
        ("cache: metadatas\n", "cache: must be one of"),
        ("posix_acl: maybe\n", "posix_acl: expected bool"),
        ("worker_cpus: 1-0\n", "f.yaml:1: worker_cpus: '1-0' is not a range of CPU numbers"),
        ("supervisor_cpus: 'x'\n", "supervisor_cpus: 'x' is not a CPU number or range"),
    ],
)
def test_option_values_are_checked(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    Path("f.yaml").write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load_yaml("f.yaml")
    assert message in str(e.value)


def test_every_fs_option_reaches_fs_options():
    """Settings.fs_options() must carry every file-system setting (else it is ignored)."""
    from vfsd.fuse.options import FsOptions

    names = [f.name for f in dataclasses.fields(FsOptions)]
    changed = {
        "shared_dir": "/x", "cache": "metadata", "xattr": True,
        "xattrmap": ":ok:all:::", "posix_acl": True, "security_label": True,
        "readonly": True, "allow_devices": "whiteouts", "writeback": True, "allow_direct_io": True,
        "readdirplus": False, "killpriv_v2": True, "announce_submounts": True,
        "inode_file_handles": "prefer", "translate_uid": ("map:0:1:1",),
        "translate_gid": ("squash-guest:0:7:10",), "preserve_noatime": True,
        "posix_lock": False, "flock": False,
    }
    assert sorted(changed) == sorted(names)
    opts = config.build({}, changed).fs_options()
    for name in names:
        assert getattr(opts, name) == changed[name], name
        assert getattr(FsOptions("/x"), name) != changed[name] or name == "shared_dir", name


def test_virtiofsd_flags_and_o_forms():
    s = cli.settings_from_args([
        "--shared-dir", "/s", "--cache", "metadata", "--posix-acl", "--no-readdirplus",
        "--killpriv-v2", "--announce-submounts", "--inode-file-handles", "--security-label",
        "--translate-uid", "map:0:100:1", "--translate-uid", "squash-guest:1:200:10",
        "--allow-direct-io", "--preserve-noatime", "--writeback", "--no-flock",
        "--xattrmap", ":ok:all:::",
    ])
    assert (s.cache, s.posix_acl, s.readdirplus, s.killpriv_v2, s.announce_submounts) == (
        "metadata", True, False, True, True)
    assert s.inode_file_handles == "prefer" and s.security_label and s.allow_direct_io
    assert s.translate_uid == ("map:0:100:1", "squash-guest:1:200:10")
    assert s.preserve_noatime and s.writeback and not s.flock and s.xattrmap == ":ok:all:::"
    s = cli.settings_from_args([
        "-o", "source=/s,xattr,no_posix_lock,cache=never,log_level=warn",
        "-o", r"xattrmap=:prefix:all::user.virtiofs.::bad:all:::,translate_gid=map:0:5:1",
        "-o", r"translate_gid=host:9:8:1,readdirplus,no_readdirplus,inode_file_handles=never",
    ])
    assert (s.shared_dir, s.xattr, s.posix_lock, s.cache, s.log_level) == (
        "/s", True, False, "never", "warning")
    assert s.xattrmap == ":prefix:all::user.virtiofs.::bad:all:::"
    assert s.translate_gid == ("map:0:5:1", "host:9:8:1")
    assert s.readdirplus is False and s.inode_file_handles == "never"
    s = cli.settings_from_args(["-o", r"xattrmap=/ok/client/a\,b//  /ok/all///"])
    assert s.xattrmap == "/ok/client/a,b//  /ok/all///"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-o", "xattrmap=:nope:all:::"], "-o xattrmap=:nope:all:::: xattrmap: invalid mapping"),
        (["-o", "no_cache"], "-o no_cache: needs a value"),
        (["-o", "cache"], "-o cache: needs a value"),
        (["-o", "xattr=sometimes"], "xattr: expected bool"),
        (["--translate-uid", "map:1"], "translate_uid: invalid translation"),
        (["--xattrmap", ":ok:"], "xattrmap: invalid mapping"),
        (["--worker-cpus", "0,,1"], "worker_cpus: '' is not a CPU number or range"),
    ],
)
def test_bad_option_values_fail_start_up_naming_the_option(argv, message, capsys):
    assert cli.main(["--shared-dir", "/nonexistent", "--socket-path", "/tmp/x.sock", *argv]) == 1
    assert message in capsys.readouterr().err


def test_inode_file_handles_never_means_one_worker(caplog):
    s = config.build({}, {"shared_dir": "/", "workers": 4, "inode_file_handles": "never"})
    assert s.worker_count == 1
    assert "running 1 worker instead of 4: inode_file_handles is never" in caplog.text
    s = config.build({}, {"shared_dir": str(REPO), "workers": 4, "inode_file_handles": "prefer"})
    assert s.worker_count == 4  # prefer on ext4: handles available
    s = config.build({}, {"shared_dir": "/proc", "workers": 3, "inode_file_handles": "prefer"})
    assert s.worker_count == 1
    s = config.build({}, {"shared_dir": "/proc", "workers": 3})
    assert s.worker_count == 3  # mandatory (the default): refused at start-up instead


def test_cpulists():
    from vfsd.affinity import format_cpulist, parse_cpulist, usable

    assert parse_cpulist("0") == {0}
    assert parse_cpulist("0-2, 5,7-8") == {0, 1, 2, 5, 7, 8}
    assert format_cpulist(frozenset({0, 1, 2, 5, 7, 8})) == "0-2,5,7-8"
    for bad in ("", "-1", "3-1", "a", "1-", "99999"):
        with pytest.raises(ValueError):
            parse_cpulist(bad)
    allowed = frozenset(os.sched_getaffinity(0))
    assert usable(allowed) == allowed
    with pytest.raises(ValueError, match="not available"):
        usable(frozenset({max(allowed) + 1}))
    top = max(allowed)
    with pytest.raises(ValueError) as e:  # ranges, not 98 numbers
        usable(frozenset(range(top + 1, top + 99)) | {top + 200})
    assert f"CPU(s) {top + 1}-{top + 98},{top + 200} not available" in str(e.value)


def test_default_worker_count_is_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """workers: 0 sizes the pool to the affinity mask and a cgroup CPU quota, not to the
    host's CPU count (one vfsd per VM: each must stay within its own share)."""
    from vfsd import affinity

    monkeypatch.setattr(affinity.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    cg = tmp_path / "cg"
    (cg / "vm1").mkdir(parents=True)
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/proc/self/cgroup":
            path = tmp_path / "self-cgroup"
        return real_open(path, *a, **kw)

    (tmp_path / "self-cgroup").write_text("0::/vm1\n")
    monkeypatch.setattr("builtins.open", fake_open)
    (cg / "vm1" / "cpu.max").write_text("max 100000\n")
    assert affinity.cpu_budget(str(cg)) == 4
    (cg / "vm1" / "cpu.max").write_text("150000 100000\n")  # CPUQuota=150%
    assert affinity.cpu_budget(str(cg)) == 2
    (cg / "vm1" / "cpu.max").write_text("10000 100000\n")
    assert affinity.cpu_budget(str(cg)) == 1
    (cg / "vm1" / "cpu.max").unlink()  # no cpu controller here: the affinity decides
    assert affinity.cpu_budget(str(cg)) == 4
    monkeypatch.setattr(affinity.os, "sched_getaffinity", lambda _pid: {2})
    assert affinity.cpu_budget(str(cg)) == 1
