"""`vfsd --print-capabilities`: the vhost-user backend capabilities JSON libvirt reads.

QEMU's "Backend program conventions" (docs/interop/vhost-user.rst, schema in
docs/interop/vhost-user.json): a backend prints `{"type": ..., "features": [...]}` and exits.
libvirt runs `<binary> --print-capabilities` for a `<filesystem>` with `<driver
type='virtiofs'/>` and reads the `fs` features it knows:

- `separate-options`: the daemon takes separate flags. libvirt then runs
  `vfsd --fd=N --shared-dir DIR [--cache never|always] [--sandbox MODE] [--xattr]
  [--thread-pool-size=N] [--rlimit-nofile=N] [--log-level debug] [--uid-map=... --gid-map=...]`
  instead of `-o source=DIR,cache=none,...` (the old C virtiofsd style, whose `cache=none`
  vfsd does not spell). vfsd's CLI accepts these flags (the id maps are only sent for
  unprivileged libvirt).
- `migrate-precopy` (what the Rust virtiofsd also prints): NOT listed. It tells libvirt the
  daemon can migrate its state with the VM; vfsd offers neither VHOST_USER_PROTOCOL_F_LOG_SHMFD
  nor device-state transfer, so libvirt must refuse to migrate a VM that uses it.
- `posix-acl-negotiation-mode`, `security-label-negotiation-mode` (newer Rust virtiofsd):
  not listed; vfsd has neither POSIX ACLs nor security labels.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

CAPABILITIES: dict[str, object] = {
    "type": "fs",
    "features": ["separate-options"],
}


def capabilities_json() -> str:
    return json.dumps(CAPABILITIES, indent=2) + "\n"


def print_capabilities(out: TextIO | None = None) -> int:
    """Print the JSON to stdout (or `out`); returns the exit code (0)."""
    (out or sys.stdout).write(capabilities_json())
    return 0
