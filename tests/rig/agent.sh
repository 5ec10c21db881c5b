#!/bin/sh
# vfsd guest command agent. Runs inside the test guest (busybox ash), started by /init with
# the virtio-serial port named "vfsd.agent" as $1. Host side: tests/rig/qemu.py (Guest.run).
#
# Why this framing: the host must tell command output apart from protocol even when the
# output is binary or lacks a trailing newline, so output travels base64-encoded between
# markers that carry the request id.
#
#   host -> guest   CMD <id> <timeout_s> <base64(command)>\n
#   guest -> host   @@READY <uptime>\n                           (agent started)
#                   @@BEGIN <id>\n
#                   <base64(stdout+stderr)>, wrapped lines\n
#                   @@END <id> <rc> ok|timeout|badcmd\n
#
# Each command runs as `sh <file>` in its own session (setsid) with stdin=/dev/null, cwd=/.
# On timeout the whole session (process group) is SIGKILLed and the reply says "timeout".
port=$1
work=/run/agent
mkdir -p "$work"
exec 3<>"$port"
echo "@@READY $(cut -d' ' -f1 /proc/uptime)" >&3

while read -r kw id tmo b64 <&3; do
    [ "$kw" = CMD ] || continue
    echo "@@BEGIN $id" >&3
    if ! printf '%s' "$b64" | base64 -d >"$work/cmd" 2>/dev/null; then
        echo "@@END $id 254 badcmd" >&3
        continue
    fi
    rm -f "$work/timedout"
    cd /
    setsid sh "$work/cmd" >"$work/out" 2>&1 </dev/null 3>&- &
    pid=$!
    (
        # Watchdog. On TERM (command done) take the sleep down too: no stray processes.
        trap 'kill $s 2>/dev/null; exit 0' TERM
        sleep "$tmo" &
        s=$!
        wait $s
        touch "$work/timedout"
        kill -KILL -"$pid" 2>/dev/null
        kill -KILL "$pid" 2>/dev/null
    ) 3>&- >/dev/null 2>&1 &
    wd=$!
    wait "$pid"
    rc=$?
    kill "$wd" 2>/dev/null
    wait "$wd" 2>/dev/null
    flag=ok
    [ -e "$work/timedout" ] && flag=timeout
    base64 "$work/out" >&3
    echo "@@END $id $rc $flag" >&3
    rm -f "$work/out" "$work/cmd"
done
echo "vfsd agent: channel closed" >/dev/console
