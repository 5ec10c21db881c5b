#!/usr/bin/env bash
# Install the Debian packages the real-guest test rig needs, only if missing.
#
# Idempotent: when everything is present it does nothing (no apt-get update, no network).
# Run as root (CI runs it before `pytest -m guest`). -q: no output when nothing is missing.
# apt's and debconf's output goes to .cache/setup.log, shown only if apt fails.
set -euo pipefail
source "$(dirname "$0")/setup-log.sh"

PKGS=(
    qemu-system-x86   # qemu-system-x86_64 (TCG, or KVM when it works)
    busybox-static    # guest userland (static, one binary + applet symlinks)
    cpio              # not strictly needed (build.py writes newc itself), handy for debugging
    fio               # copied into the guest with its shared libraries
    attr              # getfattr / setfattr for the guest
    acl               # getfacl / setfacl (host side checks)
    gcc               # static guest helper programs (tests/guest/progs/*.c)
    libc6-dev         # static libc for the above
    prometheus        # real Prometheus + promtool for tests/metrics (scrape, rules, queries)
)

missing=()
for p in "${PKGS[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]} == 0)); then
    [[ ${1:-} == -q ]] || echo "deps.sh: all rig packages present"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "deps.sh: must run as root to install: ${missing[*]}" >&2
    exit 1
fi

echo "deps.sh: installing ${missing[*]} (apt; output in $setup_log)"
export DEBIAN_FRONTEND=noninteractive
logged apt-get update -qq
logged apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "deps.sh: done"
