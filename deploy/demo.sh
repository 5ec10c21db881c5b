#!/usr/bin/env bash
# The vfsd demo: serve a directory with vfsd and boot a real Linux guest that mounts it.
#
#   bash deploy/demo.sh [--export DIR] [--workers N] [--shell | --no-guest]
#
# Run as root on Debian 12 / Ubuntu. The first run installs QEMU, busybox etc. (apt), creates
# .venv and builds the guest image (downloads a Debian kernel package); later runs only check.
# Everything the demo leaves behind is under /var/tmp/vfsd-demo/ (export, socket, logs).
# Options: bash deploy/demo.sh --help.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# Help before any set-up, which takes minutes on a fresh host. tests/rig/demo.py parses its
# options with the standard library, so the system's python3 will do before .venv exists.
for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then
        python=$(command -v .venv/bin/python python3 | head -n 1) || true
        if [[ -z "$python" ]]; then
            sed -n '3,4s/^# \{0,1\}//p' "$0"  # no Python yet: the usage line above
            exit 0
        fi
        exec "$python" -m tests.rig.demo --help
    fi
done

# Each step says what it does only when there is something to do.
bash deploy/bootstrap.sh --quiet
.venv/bin/python -m tests.rig.build >/dev/null
exec .venv/bin/python -m tests.rig.demo "$@"
