#!/usr/bin/env bash
# The vfsd demo: serve a directory with vfsd and boot a real Linux guest that mounts it.
#
#   bash deploy/demo.sh [--export DIR] [--workers N] [--shell | --no-guest]
#
# Run as root on Debian 12 / Ubuntu. The first run installs QEMU, busybox etc. (apt), creates
# .venv and builds the guest image (downloads a Debian kernel package); later runs only check.
# Everything the demo leaves behind is under /var/tmp/vfsd-demo/ (export, socket, logs).
# Options: python -m tests.rig.demo --help.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]] && [[ -x .venv/bin/python ]]; then
        exec .venv/bin/python -m tests.rig.demo --help
    fi
done

echo "--- setting up: packages, .venv, guest image (first run only)" >&2
bash deploy/bootstrap.sh
.venv/bin/python -m tests.rig.build >/dev/null
exec .venv/bin/python -m tests.rig.demo "$@"
