#!/usr/bin/env bash
# Installs what vfsd and its test rig need on a Debian/Ubuntu host (run as root), then
# creates .venv with vfsd installed in it. Idempotent: a second run only checks.
#
#   bash deploy/bootstrap.sh [--quiet]     (--quiet: no output when there is nothing to do)
#
# Each step that does something says so in one line; the tools' own output goes to
# .cache/setup.log and is shown only when a step fails.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
quiet=()
if [[ ${1:-} == --quiet ]]; then
    quiet=(-q)
fi
source tests/rig/setup-log.sh

if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "bootstrap.sh: installing python3-venv (apt; output in $setup_log)"
    logged apt-get update -qq
    logged env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
bash tests/rig/deps.sh "${quiet[@]}"

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap.sh: creating .venv"
    logged python3 -m venv .venv
fi
stamp=.venv/.vfsd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap.sh: installing vfsd and its Python packages into .venv (pip; output in" \
         "$setup_log)"
    logged .venv/bin/pip install -q --upgrade pip
    logged .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
