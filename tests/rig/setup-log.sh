# Sourced by deploy/bootstrap.sh and tests/rig/deps.sh. `logged CMD...` runs a chatty tool
# (apt-get, debconf, pip and setuptools warnings) with its output appended to $setup_log
# and prints the end of that log only if it fails, so errors stay visible.
setup_log=${VFSD_SETUP_LOG:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.cache/setup.log}

logged() {
    mkdir -p "$(dirname "$setup_log")"
    echo "=== $(date '+%F %T') $*" >>"$setup_log"
    if ! "$@" >>"$setup_log" 2>&1; then
        echo "FAILED: $*" >&2
        echo "--- last 30 lines of $setup_log ---" >&2
        tail -n 30 "$setup_log" >&2
        return 1
    fi
}
