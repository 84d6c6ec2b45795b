# Functions the scenarios share: sourced by /job/run after e2e-lib.sh and before the scenario
# (runner.py puts it in the job as /job/scenario-lib.sh; it is not part of the cached image).
# A scenario that wants its logs sent on a failure defines its own `die` (after this file, so
# it wins); the helpers here fail through `die`.
# shellcheck shell=sh

BE=/local/domain/0/backend
CONSOLE=/var/log/xen/console
PIDFILE=/run/shyped-e2e.pid

# die TEXT: fail the scenario (a scenario redefines it to send its logs first).
die() {
    e2e_fail "$@"
}

# domid NAME: the domain's id (fails if there is no such domain).
domid() { xl domid "$1" 2>/dev/null; }

# states NAME DOMID KIND DEVID: both ends' state (or "absent") of one device, one line each.
states() {
    for node in /local/domain/$2/device/$3/$4 $BE/$3/$2/$4; do
        echo "$node/state = $(xenstore-read "$node/state" 2>/dev/null || echo absent)"
        echo "$node/online = $(xenstore-read "$node/online" 2>/dev/null || echo absent)"
    done | e2e_put "$1"
}

# host_alternatives: under e2e_host, xl (shype-xl's and the daemon's actuator) is the host's
# and so are the tools its hotplug scripts call, but /etc is dom0's: the host's /usr/bin/awk
# is a link into /etc/alternatives (Debian's update-alternatives), missing in dom0 ("awk:
# command not found" from vif-bridge). Give dom0 the host's links; outside e2e_host nothing in
# dom0 uses them.
host_alternatives() {
    if [ -d /etc/alternatives ]; then
        for link in /host/etc/alternatives/*; do
            [ -e "/etc/alternatives/${link##*/}" ] || cp -a "$link" /etc/alternatives/
        done
    else
        cp -a /host/etc/alternatives /etc/alternatives
    fi
}

# start_daemon CONFIG LOG [SECONDS]: shyped in the background with the host's venv, its pid in
# PIDFILE; waits until it is ready (up to SECONDS, 180), else sends LOG and fails.
start_daemon() {
    rm -f "$PIDFILE"
    # shellcheck disable=SC2016
    e2e_host /bin/sh -c 'echo $$ >'"$PIDFILE"'; exec shyped --config "$1" run' sh "$1" \
        >"$2" 2>&1 </dev/null &
    e2e_wait_for 30 "daemon pid" test -s "$PIDFILE" || die "daemon did not start"
    e2e_wait_for "${3:-180}" "daemon ready ($2)" grep -q "ready:" "$2" || {
        e2e_put "$(basename "$2")" "$2"
        die "daemon not ready"
    }
}

# The guest program (guestprog/xenpeer.c) in a guest: it prints on its console (xenconsoled's
# log here) and takes commands from xenpeer/cmd under its own xenstore home.

# peer_setup NAME: the guest's command node, dom0's, readable by that guest only; waits until
# the program serves.
peer_setup() {
    d=$(domid "$1") || die "no domain $1"
    xenstore-write "/local/domain/$d/xenpeer/cmd" "" || die "xenstore-write $1"
    xenstore-chmod "/local/domain/$d/xenpeer" n0 "r$d" || die "chmod $1"
    xenstore-chmod "/local/domain/$d/xenpeer/cmd" n0 "r$d" || die "chmod $1"
    e2e_wait_for 120 "$1 runs xenpeer" grep -q "XENPEER - serving" "$CONSOLE/guest-$1.log" ||
        die "guest program did not start in $1"
}

# peer NAME ID WORDS...: run a command in guest NAME, wait for it, send its lines as
# peer-ID.txt (and keep them in /tmp/peer-ID.txt for the values the next steps need).
peer() {
    name=$1
    id=$2
    shift 2
    e2e_step "$name: $id $*"
    xenstore-write "/local/domain/$(domid "$name")/xenpeer/cmd" "$id $*"
    e2e_wait_for 60 "$name: $id done" grep -q "XENPEER $id done" "$CONSOLE/guest-$name.log" ||
        die "$name did not finish command $id"
    tr -d '\r' <"$CONSOLE/guest-$name.log" | grep "XENPEER $id " >"/tmp/peer-$id.txt"
    e2e_put "peer-$id.txt" "/tmp/peer-$id.txt"
}

# value ID KEY: KEY=<value> from command ID's lines ("-" when absent).
value() {
    v=$(sed -n "s/.* $2=\([0-9]*\).*/\1/p" "/tmp/peer-$1.txt" | head -n 1)
    echo "${v:--}"
}
