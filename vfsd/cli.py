"""Command line: `vfsd [serve flags]` (virtiofsd-compatible) and the subcommands `vfsd
status`, `vfsd check-config` and `vfsd bench`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from vfsd import __version__, config, hostcheck, logs, status
from vfsd.capabilities import print_capabilities

log = logging.getLogger("vfsd")


def _switch(parser: argparse.ArgumentParser, name: str, key: str,
            setting: config.Setting) -> None:
    """--NAME / --no-NAME; a switch with modes (allow_devices) takes an optional MODE."""
    if setting.kind is bool:
        parser.add_argument(f"--{name}", dest=key, action=argparse.BooleanOptionalAction,
                            help=setting.help)
        return
    assert setting.switch is not None
    on, off = setting.switch
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=key, nargs="?", const=on, choices=setting.choices,
                       metavar="MODE", help=f"{setting.help} Without MODE: {on}.")
    group.add_argument(f"--no-{name}", dest=key, action="store_const", const=off,
                       help=f"same as --{name} {off}")


#: File-system settings exposed as virtiofsd-style flags: --NAME / --no-NAME for switches,
#: --NAME VALUE otherwise (dashes in the flag, underscores in the setting key).
_FS_FLAGS = (
    "cache", "xattr", "xattrmap", "posix_acl", "security_label", "readonly", "allow_devices",
    "writeback", "allow_direct_io", "readdirplus", "killpriv_v2", "announce_submounts",
    "inode_file_handles", "translate_uid", "translate_gid", "preserve_noatime", "posix_lock",
    "flock", "metrics", "metrics_listen",
)
_NOT_IMPLEMENTED = "Accepted for virtiofsd compatibility; not implemented yet (warns)"


class Command(NamedTuple):
    run: Callable[[list[str]], int]
    args: str
    summary: str


def _epilog() -> str:
    width = max(len(f"{name} {c.args}") for name, c in COMMANDS.items())
    lines = ["commands ('vfsd COMMAND --help' for their options):"]
    lines += [f"  {name + ' ' + c.args:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    return "\n".join([*lines, "", "Every file-system flag also has a '-o' form: -o name=value,",
                       "-o name, -o no_name (names with underscores)."])


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfsd",
        usage="%(prog)s [OPTIONS]\n       %(prog)s COMMAND ...",
        description="virtio-fs host daemon: serves a host directory to a VM over vhost-user.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog(),
    )
    p.add_argument("--version", action="version", version=f"vfsd {__version__}")
    p.add_argument("--config", metavar="FILE", help="YAML settings file")
    p.add_argument("--socket-path", dest="socket_path", metavar="PATH",
                   help="vhost-user socket to listen on")
    p.add_argument("--fd", dest="socket_fd", type=int, metavar="FD",
                   help="inherited listening socket fd (instead of --socket-path)")
    p.add_argument("--shared-dir", dest="shared_dir", metavar="DIR", help="directory to export")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT]",
                   help="virtiofsd-style options: source=DIR, cache=MODE, xattr|no_xattr, "
                        "xattrmap=RULES (',' escaped as '\\,'), readonly, ...")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: CPUs)")
    p.add_argument("--thread-pool-size", dest="workers_alias", type=int, metavar="N",
                   help="virtiofsd compatibility: same as --workers")
    for key in _FS_FLAGS:
        setting = config.BY_KEY[key]
        flag = key.replace("_", "-")
        if setting.switch is not None:
            _switch(p, flag, key, setting)
        elif setting.kind is tuple:
            p.add_argument(f"--{flag}", dest=key, action="append", metavar="MAP",
                           help=setting.help + " Repeatable.")
        elif key == "inode_file_handles":
            p.add_argument(f"--{flag}", dest=key, nargs="?", const="prefer",
                           choices=setting.choices, help=setting.help)
        elif setting.choices:
            p.add_argument(f"--{flag}", dest=key, choices=setting.choices, help=setting.help)
        else:
            p.add_argument(f"--{flag}", dest=key, metavar="VALUE", help=setting.help)
    p.add_argument("--log-level", dest="log_level", metavar="LEVEL",
                   help=config.BY_KEY["log_level"].help)
    p.add_argument("--log-format", dest="log_format", choices=config.BY_KEY["log_format"].choices,
                   help=config.BY_KEY["log_format"].help + " json: one object per line.")
    p.add_argument("-d", dest="debug", action="store_true", help="same as --log-level debug")
    p.add_argument("-f", dest="foreground", action="store_true",
                   help="virtiofsd compatibility: vfsd always runs in the foreground")
    p.add_argument("--socket-group", dest="socket_group", metavar="GROUP",
                   help="group owning the vhost-user socket (mode 0660)")
    p.add_argument("--syslog", dest="syslog", action="store_const", const=True,
                   help="log to syslog/journald instead of stderr")
    p.add_argument("--rlimit-nofile", dest="rlimit_nofile", type=int, metavar="N",
                   help="open-file limit for vfsd and its workers")
    p.add_argument("--supervisor-cpus", dest="supervisor_cpus", metavar="CPULIST",
                   help="CPUs the supervisor runs on, e.g. 0 (default: inherited)")
    p.add_argument("--worker-cpus", dest="worker_cpus", metavar="CPULIST",
                   help="CPUs the workers run on, e.g. 1-3 (default: inherited)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities (JSON) and exit")
    # Accepted for drop-in compatibility, not implemented: each warns once at start-up.
    p.add_argument("--sandbox", choices=("namespace", "chroot", "none"),
                   help=f"{_NOT_IMPLEMENTED}: vfsd runs without a sandbox; confine it with "
                        "the systemd unit's hardening (deploy/vfsd@.service).")
    p.add_argument("--seccomp", choices=("none", "kill", "log", "trap"),
                   help=f"{_NOT_IMPLEMENTED}: no seccomp filter is installed.")
    p.add_argument("--modcaps", metavar="CAPS",
                   help=f"{_NOT_IMPLEMENTED}: capabilities are left as they are.")
    p.add_argument("--uid-map", dest="uid_map", action="append", metavar="MAP",
                   help=f"{_NOT_IMPLEMENTED}: vfsd runs as root; see --translate-uid.")
    p.add_argument("--gid-map", dest="gid_map", action="append", metavar="MAP",
                   help=f"{_NOT_IMPLEMENTED}: vfsd runs as root; see --translate-gid.")
    return p


#: -o names that are not setting keys.
_O_ALIASES = {"source": "shared_dir", "thread_pool_size": "workers"}


def _split_o(value: str) -> list[str]:
    """Split one -o argument at commas; '\\,' is a literal comma (xattrmap rules)."""
    items, cur, i = [], [], 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in ",\\":
            cur.append(value[i + 1])
            i += 2
            continue
        if c == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return [it for it in items if it]


def parse_o_options(values: list[str]) -> dict[str, Any]:
    """Translate `-o source=/x,cache=auto,xattr,no_readdirplus` into settings; every setting
    key is accepted as `name=value`, switches also as `name` / `no_name`."""
    out: dict[str, Any] = {}
    for value in values:
        for item in _split_o(value):
            name, eq, arg = item.partition("=")
            key = _O_ALIASES.get(name, name)
            negated = False
            if key not in config.BY_KEY and key.startswith("no_") and not eq:
                key, negated = key[3:], True
            setting = config.BY_KEY.get(key)
            if setting is None or key == "socket_fd":
                names = [*_O_ALIASES, *(k for k in config.BY_KEY if k != "socket_fd")]
                raise config.ConfigError(
                    f"-o {item}: unknown option{config.did_you_mean(name, names)}")
            where = f"-o {item}: "
            if setting.switch is not None and not eq:
                out[key] = setting.switch[negated]
            elif negated or not eq:
                raise config.ConfigError(f"-o {item}: needs a value ({name}=...)")
            elif setting.kind is tuple:
                out[key] = (*out.get(key, ()), arg)
                config.check_value(key, out[key], where)
            else:
                out[key] = config.from_text(key, arg, where)
    return out


def unimplemented_flags(argv: list[str]) -> list[str]:
    """One warning line per accepted-but-unimplemented virtiofsd flag."""
    args = serve_parser().parse_args(argv)
    out = []
    if args.sandbox not in (None, "none"):
        out.append(f"--sandbox {args.sandbox}: not implemented; running without a sandbox "
                   "(confine vfsd with the systemd unit's hardening instead)")
    if args.seccomp not in (None, "none"):
        out.append(f"--seccomp {args.seccomp}: not implemented; no seccomp filter is installed")
    if args.modcaps:
        out.append("--modcaps: not implemented; capabilities are left as they are")
    if args.uid_map or args.gid_map:
        out.append("--uid-map/--gid-map: not implemented (vfsd runs as root); use "
                   "translate_uid/translate_gid")
    return out


def settings_from_args(argv: list[str]) -> config.Settings:
    args = serve_parser().parse_args(argv)
    cli: dict[str, Any] = parse_o_options(args.options)
    if args.debug:
        cli["log_level"] = "debug"
    for key in ("socket_path", "socket_fd", "shared_dir", "log_level", "log_format",
                "socket_group", "syslog", "rlimit_nofile", "supervisor_cpus", "worker_cpus",
                *_FS_FLAGS):
        value = getattr(args, key)
        if value is not None:
            if config.BY_KEY[key].kind is tuple:
                value = (*cli.get(key, ()), *value)
            cli[key] = value
    workers = args.workers if args.workers is not None else args.workers_alias
    if workers is not None:
        cli["workers"] = workers
    file_values = config.load_yaml(args.config) if args.config else {}
    return config.build(file_values, cli)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_config(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vfsd check-config",
        description="Validate a vfsd YAML settings file. Every error is reported with file:line,"
                    " key and reason (exit status 1). What depends on the host (directories,"
                    " CPUs, groups, limits) is only a warning, since a file may be checked on"
                    " another host than the one that runs it; vfsd refuses to start on it.")
    p.add_argument("file", metavar="FILE")
    path = p.parse_args(argv).file
    try:
        values, lines = config.read_yaml(path)
        settings = config.build(values, {})
    except config.ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        print(f"{path}: {_count(len(e.problems), 'error')}", file=sys.stderr)
        return 1
    warnings = hostcheck.problems(settings)
    for key, reason in warnings:
        print(f"{path}:{lines[key]}: warning: {key}: {reason}", file=sys.stderr)
    noted = f", {_count(len(warnings), 'warning')} for this host" if warnings else ""
    print(f"{path}: OK ({_count(len(values), 'setting')} set{noted}; the other "
          f"{len(config.SETTINGS) - len(values)} at their defaults)")
    return 0


def status_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vfsd status", description=COMMANDS["status"].summary)
    p.add_argument("socket", help="the daemon's --socket-path (or its .status socket)")
    p.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    args = p.parse_args(argv)
    path = args.socket if args.socket.endswith(".status") else args.socket + ".status"
    try:
        snapshot = status.query(path)
    except OSError as e:
        print(f"vfsd status: cannot reach {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(orjson.dumps(snapshot, option=orjson.OPT_INDENT_2).decode() if args.json
          else status.render(snapshot))
    return 0


def bench_command(argv: list[str]) -> int:
    from vfsd.bench.cli import main as bench_main  # the load generator's imports are heavy

    return bench_main(argv)


COMMANDS = {
    "status": Command(status_command, "SOCKET",
                      "Show a running vfsd's workers and in-flight requests."),
    "check-config": Command(check_config, "FILE",
                            "Validate a YAML settings file (errors with file:line)."),
    "bench": Command(bench_command, "...",
                     "Drive virtio-fs back-ends over vhost-user; report ops/s and CPU per op."),
}


def _fail(problems: list[str]) -> int:
    for problem in problems:
        print(f"vfsd: {problem}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--print-capabilities" in argv:  # libvirt asks before anything else is valid
        return print_capabilities()
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]].run(argv[1:])
    try:
        settings = settings_from_args(argv)
    except config.ConfigError as e:
        return _fail(list(e.problems))
    logs.setup(settings.log_level, settings.log_format, syslog=settings.syslog)
    for warning in unimplemented_flags(argv):
        log.warning(warning)
    if not settings.shared_dir:
        return _fail(["no export: give --shared-dir DIR (or -o source=DIR)"])
    if problems := hostcheck.problems(settings):
        return _fail([f"{key}: {reason}" for key, reason in problems])
    if risk := hostcheck.device_node_risk(settings):
        log.warning(risk)
    from vfsd.supervisor import StartupError, Supervisor

    try:
        # SIGHUP re-reads the YAML file; without one there is nothing to reload.
        has_file = serve_parser().parse_args(argv).config is not None
        reload = (lambda: settings_from_args(argv)) if has_file else None
        return Supervisor(settings, reload=reload).run()
    except StartupError as e:
        return _fail([str(e)])


if __name__ == "__main__":
    sys.exit(main())
