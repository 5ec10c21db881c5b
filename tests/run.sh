#!/usr/bin/env bash
# The whole test suite, set-up included: apt packages, the virtualenv, the guest image,
# then ruff and pytest (unit, daemon-over-socket and real-guest tests).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash deploy/bootstrap.sh
.venv/bin/python -m tests.rig.build
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -v -rs --durations=15 "$@"
