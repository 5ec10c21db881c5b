"""Settings: one declaration per setting, read from defaults < YAML file < command line.

Each `Setting` carries its YAML key, type, default, validator and help text (gunicorn's
`config.py` habit), so the parser, the validation and `config/vfsd.yaml` cannot drift apart.
Errors name the file, line, key and reason.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from vfsd.fuse.options import FsOptions


class ConfigError(Exception):
    """A setting is unknown, of the wrong type or out of range."""


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # returns a reason if invalid


def _positive(v: int) -> str | None:
    return None if v > 0 else "must be > 0"


def _workers(v: int) -> str | None:
    return None if 1 <= v <= 255 else "must be between 1 and 255"


SETTINGS: tuple[Setting, ...] = (
    Setting("shared_dir", str, None, "Host directory exported to the guest (required)."),
    Setting("socket_path", str, None, "vhost-user Unix socket vfsd listens on (QEMU connects)."),
    Setting("socket_fd", int, None, "Already-listening socket fd inherited from the caller."),
    Setting("workers", int, 0, "Worker processes; 0 = one per CPU.", check=lambda v: None
            if 0 <= v <= 255 else "must be between 0 and 255"),
    Setting("num_queues", int, 3, "Request queues vfsd accepts (plus the hiprio queue).",
            check=_positive),
    Setting("cache", str, "auto", "Guest caching: never (0 s timeouts, direct I/O), auto (1 s),"
            " always (1 day, keep page cache).", choices=("never", "auto", "always")),
    Setting("xattr", bool, False, "Serve extended attributes."),
    Setting("readonly", bool, False, "Refuse every write with EROFS."),
    Setting("allow_devices", bool, False, "Let the guest create device nodes (MKNOD)."),
    Setting("writeback", bool, False, "Let the guest kernel cache writes (FUSE writeback)."),
    Setting("readdirplus", bool, True, "Answer READDIRPLUS (attributes with directory entries)."),
    Setting("inode_capacity", int, 1 << 20, "Live inodes the shared table holds.",
            check=_positive),
    Setting("log_level", str, "info", "Log level.",
            choices=("debug", "info", "warning", "error")),
    Setting("log_format", str, "text", "Log format on stderr.", choices=("text", "json")),
)

BY_KEY = {s.key: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class Settings:
    shared_dir: str | None = None
    socket_path: str | None = None
    socket_fd: int | None = None
    workers: int = 0
    num_queues: int = 3
    cache: str = "auto"
    xattr: bool = False
    readonly: bool = False
    allow_devices: bool = False
    writeback: bool = False
    readdirplus: bool = True
    inode_capacity: int = 1 << 20
    log_level: str = "info"
    log_format: str = "text"

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def fs_options(self) -> FsOptions:
        """The subset of settings the FUSE session and the passthrough file system use."""
        assert self.shared_dir is not None
        return FsOptions(
            shared_dir=self.shared_dir,
            cache=self.cache,  # type: ignore[arg-type]  # validated against its choices
            xattr=self.xattr,
            readonly=self.readonly,
            allow_devices=self.allow_devices,
            writeback=self.writeback,
            readdirplus=self.readdirplus,
        )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def check_value(key: str, value: Any, where: str = "") -> Any:
    """Validate one value for `key`; returns it (ints accept digit strings from the CLI)."""
    prefix = f"{where}{key}: "
    setting = BY_KEY.get(key)
    if setting is None:
        raise ConfigError(f"{where}unknown setting '{key}'")
    if value is None:
        return None
    if setting.kind is int and isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if setting.kind is bool and isinstance(value, str):
        lowered = value.lower()
        if lowered in ("true", "yes", "on", "1"):
            value = True
        elif lowered in ("false", "no", "off", "0"):
            value = False
    if not isinstance(value, setting.kind) or (setting.kind is int and isinstance(value, bool)):
        raise ConfigError(f"{prefix}expected {setting.kind.__name__}, got {value!r}")
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{prefix}must be one of {', '.join(setting.choices)}, got {value!r}")
    if setting.check and (reason := setting.check(value)):
        raise ConfigError(f"{prefix}{reason}")
    return value


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML settings file; every error names file, line and key."""
    try:
        with open(path, encoding="utf-8") as f:
            root = yaml.compose(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: top level must be a mapping")
    values: dict[str, Any] = {}
    loader = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        key = key_node.value
        where = f"{path}:{key_node.start_mark.line + 1}: "
        if key in values:
            raise ConfigError(f"{where}{key}: set twice")
        value = loader.construct_object(value_node, deep=True)
        values[key] = check_value(key, value, where)
    return values


def build(file_values: dict[str, Any], cli_values: dict[str, Any]) -> Settings:
    """Defaults < YAML < CLI (None on the CLI means 'not given')."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    for key, value in merged.items():
        merged[key] = check_value(key, value)
    return Settings(**merged)
