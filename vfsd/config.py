"""Settings: one declaration per setting, read from defaults < YAML file < command line.

Each `Setting` carries its YAML key, type, default, validator and help text (gunicorn's
`config.py` habit), so the parser, the validation and `config/vfsd.yaml` cannot drift apart.
Errors name the file, line, key and reason.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from vfsd.affinity import parse_cpulist
from vfsd.fuse.idmap import IdMap, IdMapError
from vfsd.fuse.options import CACHE_MODES, HANDLE_MODES, FsOptions
from vfsd.fuse.xattrmap import XattrMap, XattrMapError
from vfsd.metrics.http import parse_listen

log = logging.getLogger("vfsd.config")


class ConfigError(Exception):
    """A setting is unknown, of the wrong type or out of range."""


#: Nesting a settings file may use (it needs 2): PyYAML composes recursively, and a deeply
#: nested file would otherwise end in RecursionError.
MAX_DEPTH = 32
_INT = re.compile(r"-?[0-9]{1,19}")  # an int as the command line spells it (ASCII digits)
# Values in error messages are shortened: an alias bomb's repr would be gigabytes.
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother = 2, 80, 80
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = _SHOW.maxset = 4


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # returns a reason if invalid


def _nonempty(v: str) -> str | None:
    return None if v else "must not be empty"


def _positive(v: int) -> str | None:
    return None if v > 0 else "must be > 0"


def _xattrmap(v: str) -> str | None:
    try:
        XattrMap(v)
    except XattrMapError as e:
        return f"invalid mapping: {e}"
    return None


def _idmap(v: tuple[str, ...]) -> str | None:
    try:
        IdMap(v)
    except IdMapError as e:
        return f"invalid translation: {e}"
    return None


def _listen_address(v: str) -> str | None:
    try:
        parse_listen(v)
    except ValueError as e:
        return str(e)
    return None


def _cpulist(v: str) -> str | None:
    try:
        parse_cpulist(v)
    except ValueError as e:
        return str(e)
    return None


SETTINGS: tuple[Setting, ...] = (
    Setting("shared_dir", str, None, "Host directory exported to the guest (required).",
            check=_nonempty),
    Setting("socket_path", str, None, "vhost-user Unix socket vfsd listens on (QEMU connects)."),
    Setting("socket_fd", int, None, "Already-listening socket fd inherited from the caller."),
    Setting("workers", int, 0, "Worker processes; 0 = one per CPU.", check=lambda v: None
            if 0 <= v <= 255 else "must be between 0 and 255"),
    Setting("num_queues", int, 3, "Request queues vfsd accepts (plus the hiprio queue).",
            check=_positive),
    Setting("cache", str, "auto", "Guest caching: never (0 s timeouts, direct I/O), auto (1 s),"
            " metadata (1 day, file data uncached), always (1 day, keep page cache).",
            choices=CACHE_MODES),
    Setting("xattr", bool, False, "Serve extended attributes."),
    Setting("xattrmap", str, None, "virtiofsd xattr name mapping rules, e.g."
            " ':prefix:all::user.virtiofs.::bad:all:::'.", check=_xattrmap),
    Setting("posix_acl", bool, False, "POSIX ACLs (FUSE_POSIX_ACL); implies xattr."),
    Setting("security_label", bool, False, "Store the security label the guest LSM gives new"
            " files (FUSE_SECURITY_CTX)."),
    Setting("readonly", bool, False, "Refuse every write with EROFS."),
    Setting("allow_devices", bool, False, "Let the guest create device nodes (MKNOD)."),
    Setting("writeback", bool, False, "Let the guest kernel cache writes (FUSE writeback)."),
    Setting("allow_direct_io", bool, False, "Honour the guest's O_DIRECT on the host."),
    Setting("readdirplus", bool, True, "Answer READDIRPLUS (attributes with directory entries)."),
    Setting("killpriv_v2", bool, False, "Clear suid/sgid on write/truncate/chown in the server"
            " (FUSE_HANDLE_KILLPRIV_V2)."),
    Setting("announce_submounts", bool, False, "Mount points in the export become guest"
            " submounts with their own st_dev (FUSE_SUBMOUNTS)."),
    Setting("inode_file_handles", str, "mandatory", "never (O_PATH fds; forces 1 worker),"
            " prefer (file handles when the file system has them, else 1 worker), mandatory"
            " (refuse an export without them).", choices=HANDLE_MODES),
    Setting("translate_uid", tuple, (), "UID translations (virtiofsd forms: map:G:H:N,"
            " squash-guest:G:H:N, forbid-guest:G:N, ...).", check=_idmap),
    Setting("translate_gid", tuple, (), "GID translations (same forms as translate_uid).",
            check=_idmap),
    Setting("preserve_noatime", bool, False, "Pass the guest's O_NOATIME to the host."),
    Setting("posix_lock", bool, True, "fcntl byte-range locks held on the host"
            " (FUSE_POSIX_LOCKS)."),
    Setting("flock", bool, True, "flock() locks held on the host (FUSE_FLOCK_LOCKS)."),
    Setting("inode_capacity", int, 1 << 20, "Live inodes the shared table holds.",
            check=_positive),
    Setting("log_level", str, "info", "Log level.",
            choices=("debug", "info", "warning", "error")),
    Setting("log_format", str, "text", "Log format on stderr.", choices=("text", "json")),
    Setting("socket_group", str, None, "Group owning the vhost-user socket (mode 0660)."),
    Setting("syslog", bool, False, "Log to syslog/journald instead of stderr."),
    Setting("rlimit_nofile", int, None, "Open-file limit for vfsd and its workers.",
            check=_positive),
    Setting("supervisor_cpus", str, None, "CPUs the supervisor runs on (a cpulist: '0',"
            " '0-1,4'); default: inherited.", check=_cpulist),
    Setting("worker_cpus", str, None, "CPUs the workers run on (a cpulist); default:"
            " inherited. Keep them off the supervisor's CPU on small hosts.", check=_cpulist),
    Setting("metrics", bool, True, "Serve Prometheus metrics."),
    Setting("metrics_listen", str, "127.0.0.1:9720", "HOST:PORT of the /metrics endpoint.",
            check=_listen_address),
)

BY_KEY = {s.key: s for s in SETTINGS}
_LOGGED: set[str] = set()


@dataclass(frozen=True, slots=True)
class Settings:
    shared_dir: str | None = None
    socket_path: str | None = None
    socket_fd: int | None = None
    workers: int = 0
    num_queues: int = 3
    cache: str = "auto"
    xattr: bool = False
    xattrmap: str | None = None
    posix_acl: bool = False
    security_label: bool = False
    readonly: bool = False
    allow_devices: bool = False
    writeback: bool = False
    allow_direct_io: bool = False
    readdirplus: bool = True
    killpriv_v2: bool = False
    announce_submounts: bool = False
    inode_file_handles: str = "mandatory"
    translate_uid: tuple[str, ...] = ()
    translate_gid: tuple[str, ...] = ()
    preserve_noatime: bool = False
    posix_lock: bool = True
    flock: bool = True
    inode_capacity: int = 1 << 20
    log_level: str = "info"
    log_format: str = "text"
    socket_group: str | None = None
    syslog: bool = False
    rlimit_nofile: int | None = None
    supervisor_cpus: str | None = None
    worker_cpus: str | None = None
    metrics: bool = True
    metrics_listen: str = "127.0.0.1:9720"

    @property
    def worker_count(self) -> int:
        """Worker processes to run: `workers` (0 = one per CPU), but 1 when inodes cannot be
        shared between processes (inode_file_handles never, or prefer on an export without
        file handles): only file handles let any worker reopen any inode."""
        n = self.workers or os.cpu_count() or 1
        if n > 1 and (reason := self.single_worker_reason()) is not None:
            if reason not in _LOGGED:
                _LOGGED.add(reason)
                log.warning("running 1 worker instead of %d: %s (workers share inodes only "
                            "through file handles)", n, reason)
            return 1
        return n

    def single_worker_reason(self) -> str | None:
        if self.inode_file_handles == "never":
            return "inode_file_handles is never"
        if self.inode_file_handles == "prefer" and self.shared_dir:
            from workers.passthrough.file_handle import export_has_handles

            if not export_has_handles(self.shared_dir):
                return f"{self.shared_dir} has no file-handle support"
        return None

    def fs_options(self) -> FsOptions:
        """The subset of settings the FUSE session and the passthrough file system use:
        every FsOptions field is a setting of the same name."""
        assert self.shared_dir is not None
        return FsOptions(**{f.name: getattr(self, f.name)
                            for f in dataclasses.fields(FsOptions)})

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
    if setting.kind is int and isinstance(value, str) and _INT.fullmatch(value):
        value = int(value)
    if setting.kind is tuple:
        if isinstance(value, str):
            value = (value,)
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        else:
            raise ConfigError(f"{prefix}expected a string or a list of strings, "
                              f"got {_SHOW.repr(value)}")
    if setting.kind is bool and isinstance(value, str):
        lowered = value.lower()
        if lowered in ("true", "yes", "on", "1"):
            value = True
        elif lowered in ("false", "no", "off", "0"):
            value = False
    if not isinstance(value, setting.kind) or (setting.kind is int and isinstance(value, bool)):
        kind = "list" if setting.kind is tuple else setting.kind.__name__
        raise ConfigError(f"{prefix}expected {kind}, got {_SHOW.repr(value)}")
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{prefix}must be one of {', '.join(setting.choices)}, "
                          f"got {_SHOW.repr(value)}")
    if setting.check and (reason := setting.check(value)):
        raise ConfigError(f"{prefix}{reason}")
    return value


def _compose(path: str) -> yaml.Node | None:
    """The file's node tree, after checking on the parser's events that it nests at most
    MAX_DEPTH levels and has no tags: settings are plain values, and PyYAML's constructors
    fail in their own ways on a value that does not fit its tag (`!!int ''` IndexError,
    `!!bool x` KeyError, ...); untagged values only get the tags their text matches."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.NodeEvent) and getattr(event, "tag", None) not in (
                    None, "!"):
                raise ConfigError(f"{path}:{event.start_mark.line + 1}: YAML tags such as "
                                  f"{event.tag!r} are not allowed in a settings file")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{path}:{event.start_mark.line + 1}: nested deeper "
                                      f"than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML settings file; every error names file, line and key."""
    root = _compose(path)
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: top level must be a mapping")
    values: dict[str, Any] = {}
    loader = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        where = f"{path}:{key_node.start_mark.line + 1}: "
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{where}a key must be a setting name, not a {key_node.id}")
        key = key_node.value
        if key in values:
            raise ConfigError(f"{where}{key}: set twice")
        try:
            value = loader.construct_object(value_node, deep=True)
        except (yaml.YAMLError, ValueError) as e:  # ValueError: a date such as 2024-13-01
            raise ConfigError(f"{where}{key}: invalid value: {e}") from e
        values[key] = check_value(key, value, where)
    return values


def build(file_values: dict[str, Any], cli_values: dict[str, Any]) -> Settings:
    """Defaults < YAML < CLI (None on the CLI means 'not given')."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    for key, value in merged.items():
        merged[key] = check_value(key, value)
    return Settings(**merged)
