"""Settings: one declaration per setting, read from defaults < YAML file < command line.

Each `Setting` carries its YAML key, type, default, validator and help text (gunicorn's
`config.py` habit), so the parser, the validation and `config/vfsd.yaml` cannot drift apart.
Errors name the file, line, key and reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from vfsd.affinity import cpu_budget, parse_cpulist
from vfsd.fs.inode_table import MAX_CAPACITY
from vfsd.fuse.idmap import IdMap, IdMapError
from vfsd.fuse.options import CACHE_MODES, DEVICE_MODES, HANDLE_MODES, FsOptions
from vfsd.fuse.xattrmap import XattrMap, XattrMapError
from vfsd.metrics.http import parse_listen

log = logging.getLogger("vfsd.config")


class ConfigError(Exception):
    """Settings that are unknown, of the wrong type or out of range: one line per problem."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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
    #: Other spellings of a choice (virtiofsd's log levels; true/false for a mode).
    aliases: Mapping[str | bool, str] = field(default_factory=dict)

    @property
    def switch(self) -> tuple[Any, Any] | None:
        """The values of --NAME and --no-NAME (-o NAME, -o no_NAME), if it is a switch."""
        if self.kind is bool:
            return True, False
        if True in self.aliases and False in self.aliases:
            return self.aliases[True], self.aliases[False]
        return None


def _between(low: int, high: int) -> Callable[[int], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


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
    Setting("socket_fd", int, None, "Already-listening socket fd inherited from the caller.",
            check=_between(0, (1 << 31) - 1)),  # a C int
    Setting("workers", int, 0, "Worker processes; 0 = one per CPU.", check=_between(0, 255)),
    # vhost-user queue indices are 8 bits, and one is the hiprio queue.
    Setting("num_queues", int, 3, "Request queues vfsd accepts (plus the hiprio queue).",
            check=_between(1, 255)),
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
    Setting("allow_devices", str, "all", "Device nodes the guest may create (MKNOD): all (as"
            " virtiofsd; true), whiteouts (only overlayfs' 0:0 character devices), none"
            " (false).", choices=DEVICE_MODES, aliases={True: "all", False: "none"}),
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
    # The guest holds a lookup on every inode in its dentry cache: a smaller table fails
    # ordinary directory listings.
    Setting("inode_capacity", int, 1 << 20, "Live inodes the shared table holds.",
            check=_between(1024, MAX_CAPACITY)),
    Setting("log_level", str, "info", "Log level: debug, info, warning, error (virtiofsd's"
            " trace = debug, warn, err and off = error are accepted too).",
            choices=("debug", "info", "warning", "error"),
            # False: YAML 1.1 reads an unquoted `off` as a boolean.
            aliases={"trace": "debug", "warn": "warning", "err": "error", "off": "error",
                     False: "error"}),
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
    allow_devices: str = "all"
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
        """Worker processes to run: `workers` (0 = one per CPU this process may use: affinity,
        cpuset and CPU quota, see `cpu_budget`), but 1 when inodes cannot be
        shared between processes (inode_file_handles never, or prefer on an export without
        file handles): only file handles let any worker reopen any inode."""
        n = self.workers or cpu_budget()
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


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate to a misspelt `word`, else ''."""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_WORDS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}
_QUOTED = ": a quoted value is a string in YAML"


def _word_value(setting: Setting, text: str) -> Any:
    """What command-line `text` stands for as a value of `setting` (None if nothing)."""
    if setting.switch is not None and text.lower() in _WORDS:
        on, off = setting.switch
        return on if _WORDS[text.lower()] else off
    if setting.kind is int and _INT.fullmatch(text):
        return int(text)
    return None


def _wrong_type(setting: Setting, value: Any) -> str:
    kind = "list" if setting.kind is tuple else setting.kind.__name__
    reason = f"expected {kind}, got {_SHOW.repr(value)}"
    if isinstance(value, str) and setting.kind in (bool, int):
        # "false" would be true as a non-empty string: a trap, so never convert.
        reason += _QUOTED
        if (word := _word_value(setting, value)) is not None:
            reason += f"; write {str(word).lower()} without quotes"
    return reason


def _not_a_choice(setting: Setting, value: str) -> str:
    names = [*setting.choices, *(a for a in setting.aliases if isinstance(a, str))]
    reason = f"must be one of {', '.join(names)}"
    if setting.switch is not None:
        reason += " (or true, false)"
    reason += f", got {_SHOW.repr(value)}"
    if setting.switch is not None and value.lower() in _WORDS:
        return f"{reason}{_QUOTED}; write {str(_WORDS[value.lower()]).lower()} without quotes"
    return reason + did_you_mean(value, names)


def from_text(key: str, text: str, where: str = "") -> Any:
    """A command-line value (always text) for `key`: yes/no words for switches, digits for
    numbers; then checked like a YAML value."""
    word = _word_value(BY_KEY[key], text)
    return check_value(key, text if word is None else word, where)


def check_value(key: str, value: Any, where: str = "") -> Any:
    """Validate one value for `key` as its type (no conversion from strings, so YAML's
    `readonly: "false"` fails); returns it with aliases resolved."""
    setting = BY_KEY.get(key)
    if setting is None:
        raise ConfigError(f"{where}unknown setting '{key}'{did_you_mean(key, BY_KEY)}")
    prefix = f"{where}{key}: "
    if value is None:
        if setting.default is None:
            return None
        raise ConfigError(f"{prefix}no value (leave the key out for the default, "
                          f"{setting.default!r})")
    if type(value) in (str, bool) and value in setting.aliases:
        value = setting.aliases[value]
    if setting.kind is tuple:
        if isinstance(value, str):
            value = (value,)
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        else:
            raise ConfigError(f"{prefix}expected a string or a list of strings, "
                              f"got {_SHOW.repr(value)}")
    if not isinstance(value, setting.kind) or (setting.kind is int and isinstance(value, bool)):
        raise ConfigError(f"{prefix}{_wrong_type(setting, value)}")
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{prefix}{_not_a_choice(setting, value)}")
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


def read_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML settings file's values and the line of each key. Raises ConfigError naming
    file, line, key and reason for every problem in the file, not only the first."""
    root = _compose(path)
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: top level must be a mapping")
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    problems: list[str] = []
    loader = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        where = f"{path}:{line}: "
        if not isinstance(key_node, yaml.ScalarNode):
            problems.append(f"{where}a key must be a setting name, not a {key_node.id}")
            continue
        key = key_node.value
        if key in lines:
            problems.append(f"{where}{key}: set twice (first on line {lines[key]})")
            continue
        lines[key] = line
        try:
            values[key] = check_value(key, loader.construct_object(value_node, deep=True), where)
        except ConfigError as e:
            problems += e.problems
        except (yaml.YAMLError, ValueError) as e:  # ValueError: a date such as 2024-13-01
            problems.append(f"{where}{key}: invalid value: {e}")
    if problems:
        raise ConfigError(*problems)
    return values, lines


def load_yaml(path: str) -> dict[str, Any]:
    """The values of a YAML settings file (see read_yaml)."""
    return read_yaml(path)[0]


def build(file_values: dict[str, Any], cli_values: dict[str, Any]) -> Settings:
    """Defaults < YAML < CLI (None on the CLI means 'not given')."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    problems: list[str] = []
    for key, value in merged.items():
        try:
            merged[key] = check_value(key, value)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(*problems)
    return Settings(**merged)
