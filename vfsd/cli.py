"""Command line: `vfsd [serve flags]` (virtiofsd-compatible) and `vfsd check-config FILE`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import orjson

from vfsd import __version__, config, logs, status
from vfsd.capabilities import print_capabilities

log = logging.getLogger("vfsd")


def _bool_flag(parser: argparse.ArgumentParser, name: str, key: str, help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=key, action="store_const", const=True, help=help)
    group.add_argument(f"--no-{name}", dest=key, action="store_const", const=False)


#: File-system settings exposed as virtiofsd-style flags: --NAME / --no-NAME for booleans,
#: --NAME VALUE otherwise (dashes in the flag, underscores in the setting key).
_FS_FLAGS = (
    "cache", "xattr", "xattrmap", "posix_acl", "security_label", "readonly", "allow_devices",
    "writeback", "allow_direct_io", "readdirplus", "killpriv_v2", "announce_submounts",
    "inode_file_handles", "translate_uid", "translate_gid", "preserve_noatime", "posix_lock",
    "flock", "metrics", "metrics_listen",
)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfsd",
        description="virtio-fs host daemon: serves a host directory to a VM over vhost-user.",
        epilog="Other commands: 'vfsd check-config FILE', 'vfsd status SOCKET', 'vfsd bench'. "
               "Every file-system flag also has a '-o' form: -o name=value, -o name, "
               "-o no_name (names with underscores).",
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
        if setting.kind is bool:
            _bool_flag(p, flag, key, setting.help)
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
    p.add_argument("--log-level", dest="log_level", type=_log_level, metavar="LEVEL",
                   help="error, warn(ing), info, debug (virtiofsd's trace = debug, off = error)")
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
    p.add_argument("--sandbox", choices=("namespace", "chroot", "none"))
    p.add_argument("--seccomp", choices=("none", "kill", "log", "trap"))
    p.add_argument("--modcaps", metavar="CAPS")
    p.add_argument("--uid-map", dest="uid_map", action="append", metavar="MAP")
    p.add_argument("--gid-map", dest="gid_map", action="append", metavar="MAP")
    p.add_argument("--log-format", dest="log_format", choices=("text", "json"))
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
    key is accepted as `name=value`, booleans also as `name` / `no_name`."""
    out: dict[str, Any] = {}
    for value in values:
        for item in _split_o(value):
            name, eq, arg = item.partition("=")
            key = _O_ALIASES.get(name, name)
            negated = False
            if key not in config.BY_KEY and key.startswith("no_") and not eq:
                key, negated = key[3:], True
            setting = config.BY_KEY.get(key)
            if setting is None or key in ("socket_fd",):
                raise config.ConfigError(f"-o {item}: unknown option")
            where = f"-o {item}: "
            if setting.kind is bool and not eq:
                out[key] = not negated
            elif negated or not eq:
                raise config.ConfigError(f"-o {item}: needs a value ({name}=...)")
            elif setting.kind is tuple:
                out[key] = (*out.get(key, ()), arg)
                config.check_value(key, out[key], where)
            else:
                if key == "log_level":  # virtiofsd spells these err / warn
                    arg = {"err": "error", "warn": "warning"}.get(arg, arg)
                out[key] = config.check_value(key, arg, where)
    return out


_LOG_ALIASES = {"warn": "warning", "err": "error", "trace": "debug", "off": "error"}


def _log_level(value: str) -> str:
    level = _LOG_ALIASES.get(value, value)
    if level not in ("debug", "info", "warning", "error"):
        raise argparse.ArgumentTypeError(f"invalid log level {value!r}")
    return level


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


def check_config(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: vfsd check-config FILE", file=sys.stderr)
        return 2
    try:
        settings = config.build(config.load_yaml(argv[0]), {})
    except config.ConfigError as e:
        print(f"vfsd: {e}", file=sys.stderr)
        return 1
    print(f"{argv[0]}: OK ({len([k for k in config.BY_KEY if getattr(settings, k) is not None])}"
          " settings)")
    return 0


def status_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vfsd status",
                                description="Show a running vfsd's workers and in-flight "
                                            "requests.")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--print-capabilities" in argv:  # libvirt asks before anything else is valid
        return print_capabilities()
    if argv and argv[0] == "check-config":
        return check_config(argv[1:])
    if argv and argv[0] == "status":
        return status_command(argv[1:])
    if argv and argv[0] == "bench":
        from vfsd.bench.cli import main as bench_main

        return bench_main(argv[1:])
    try:
        settings = settings_from_args(argv)
    except config.ConfigError as e:
        print(f"vfsd: {e}", file=sys.stderr)
        return 1
    logs.setup(settings.log_level, settings.log_format, syslog=settings.syslog)
    for warning in unimplemented_flags(argv):
        log.warning(warning)
    if not settings.shared_dir:
        print("vfsd: no export: give --shared-dir DIR (or -o source=DIR)", file=sys.stderr)
        return 1
    from vfsd.supervisor import StartupError, Supervisor

    try:
        return Supervisor(settings, reload=lambda: settings_from_args(argv)).run()
    except StartupError as e:
        print(f"vfsd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
