"""The YAML settings loader and validation (`vfsd/config.py`): `load_yaml` + `build`, then
`Settings.fs_options()` (what the daemon builds from them), and the command line's string
form of each setting (`check_value`).

Input: a YAML file; or, when the first byte is 0, `u8 setting index` and a string value as
the command line would give it. The only documented error is `ConfigError`. PyYAML is
instrumented too. Alias bombs and deep nesting must fail fast, not hang or eat memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from vfsd.config import SETTINGS, ConfigError, build, check_value, load_yaml

MAX_LEN = 8192
_fd = -1


def prepare() -> None:
    global _fd
    _fd = os.memfd_create("fuzz-vfsd.yaml", os.MFD_CLOEXEC)


def one_input(data: bytes) -> None:
    if data[:1] == b"\0":
        setting = SETTINGS[data[1] % len(SETTINGS)] if len(data) > 1 else SETTINGS[0]
        try:
            check_value(setting.key, data[2:].decode("utf-8", "replace"))
        except ConfigError:
            pass
        return
    os.ftruncate(_fd, 0)
    os.pwrite(_fd, data, 0)
    try:
        settings = build(load_yaml(f"/proc/self/fd/{_fd}"), {})
    except ConfigError:
        return
    if settings.shared_dir is not None:
        settings.fs_options()


def seeds() -> Iterator[bytes]:
    from pathlib import Path

    yield (Path(__file__).resolve().parents[2] / "config" / "vfsd.yaml").read_bytes()
    yield (b"shared_dir: /srv/export\nsocket_path: /run/vfsd.sock\nworkers: 4\ncache: always\n"
           b"xattr: true\nxattrmap: ':map:trusted.:user.virtiofs.:'\n"
           b"translate_uid: [map:0:100000:65536, 'forbid-guest:65536:1']\n"
           b"translate_gid: squash-guest:0:100:65536\nworker_cpus: 1-3\n"
           b"supervisor_cpus: '0'\nmetrics_listen: '[::1]:9720'\nrlimit_nofile: 65536\n")
    yield b"workers: &w 2\nnum_queues: *w\nlog_level: debug\nlog_format: json\n"
    yield b"a: [&x [1, 2], *x]\n"
    yield b"workers: !!int '3'\nreadonly: yes\nflock: off\n"
    yield b"--- \n"
    yield b"- not a mapping\n"
    yield b"workers: 1\nworkers: 2\n"
    yield b"{shared_dir: /x, workers: -1}\n"
    for i, setting in enumerate(SETTINGS):
        yield bytes([0, i]) + str(setting.default).encode()
