"""Settings: defaults, YAML validation with file/line/key in errors, CLI precedence."""

import dataclasses
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
        ("cache: sometimes\n", "f.yaml:1: cache: must be one of never, auto, always"),
        ("workers: many\n", "f.yaml:1: workers: expected int, got 'many'"),
        ("workers: 999\n", "f.yaml:1: workers: must be between 0 and 255"),
        ("xattr: 3\n", "f.yaml:1: xattr: expected bool"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("cache: auto\ncache: never\n", "f.yaml:2: cache: set twice"),
        ("workers: [1\n", "invalid YAML"),
    ],
)
def test_yaml_errors_name_file_line_key(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    Path("f.yaml").write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load_yaml("f.yaml")
    assert message in str(e.value)


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
