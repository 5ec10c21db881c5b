"""Command line: `vfsd [serve flags]` (virtiofsd-compatible) and `vfsd check-config FILE`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from vfsd import __version__, config, logs

log = logging.getLogger("vfsd")


def _bool_flag(parser: argparse.ArgumentParser, name: str, key: str, help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=key, action="store_const", const=True, help=help)
    group.add_argument(f"--no-{name}", dest=key, action="store_const", const=False)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfsd",
        description="virtio-fs host daemon: serves a host directory to a VM over vhost-user.",
        epilog="Other commands: 'vfsd check-config FILE'.",
    )
    p.add_argument("--version", action="version", version=f"vfsd {__version__}")
    p.add_argument("--config", metavar="FILE", help="YAML settings file")
    p.add_argument("--socket-path", dest="socket_path", metavar="PATH",
                   help="vhost-user socket to listen on")
    p.add_argument("--fd", dest="socket_fd", type=int, metavar="FD",
                   help="inherited listening socket fd (instead of --socket-path)")
    p.add_argument("--shared-dir", dest="shared_dir", metavar="DIR", help="directory to export")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT]",
                   help="virtiofsd-style options: source=DIR, cache=never|auto|always, "
                        "xattr|no_xattr, readonly")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: CPUs)")
    p.add_argument("--thread-pool-size", dest="workers_alias", type=int, metavar="N",
                   help="virtiofsd compatibility: same as --workers")
    p.add_argument("--cache", choices=("never", "auto", "always"))
    _bool_flag(p, "xattr", "xattr", "serve extended attributes")
    _bool_flag(p, "readonly", "readonly", "refuse every write (EROFS)")
    p.add_argument("--log-level", dest="log_level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", dest="log_format", choices=("text", "json"))
    return p


_O_OPTIONS = {"cache", "source", "xattr", "no_xattr", "readonly"}


def parse_o_options(values: list[str]) -> dict[str, Any]:
    """Translate `-o source=/x,cache=auto,xattr` into settings."""
    out: dict[str, Any] = {}
    for value in values:
        for item in filter(None, value.split(",")):
            name, _, arg = item.partition("=")
            if name not in _O_OPTIONS:
                raise config.ConfigError(f"-o {item}: unknown option")
            if name == "source":
                out["shared_dir"] = arg
            elif name == "cache":
                out["cache"] = arg
            elif name in ("xattr", "no_xattr"):
                out["xattr"] = name == "xattr"
            elif name == "readonly":
                out["readonly"] = True
    return out


def settings_from_args(argv: list[str]) -> config.Settings:
    args = serve_parser().parse_args(argv)
    cli: dict[str, Any] = parse_o_options(args.options)
    for key in ("socket_path", "socket_fd", "shared_dir", "cache", "xattr", "readonly",
                "log_level", "log_format"):
        value = getattr(args, key)
        if value is not None:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "check-config":
        return check_config(argv[1:])
    try:
        settings = settings_from_args(argv)
    except config.ConfigError as e:
        print(f"vfsd: {e}", file=sys.stderr)
        return 1
    logs.setup(settings.log_level, settings.log_format)
    if not settings.shared_dir:
        print("vfsd: no export: give --shared-dir DIR (or -o source=DIR)", file=sys.stderr)
        return 1
    from vfsd.supervisor import StartupError, Supervisor

    try:
        return Supervisor(settings).run()
    except StartupError as e:
        print(f"vfsd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
