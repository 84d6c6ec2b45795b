# The daemon on real Xen: shyped (real `xl` actuator, dom0's oxenstored) decides guests created
# with shype-xl and plain xl, under tests/e2e/daemon/policy.toml:
#   1. green (shype-xl create -p, then xl unpause): admitted, label node, vif and vbd connect;
#   2. red (xl create -p, Chinese Wall conflict with green): destroyed by the daemon;
#   3. blue (xl create -p, vif on xenbr0 labelled for green only): the vif is cut and removed,
#      blue keeps running;
#   4. the daemon killed (SIGKILL), red2 created meanwhile, the daemon restarted: reconcile
#      re-admits green and blue and destroys red2;
#   5. a permissive daemon: blue2's vif (same denial) connects, the denial is logged.
# Every check the host makes is on result files; this script fails only when a step cannot go
# on (a wait timed out), so the host test names what differed.
# Sourced by /job/run after e2e-lib.sh and scenario-lib.sh; cwd is /job/files.
set -u
F=$E2E_FILES
SOCK=/run/shyped/control.sock
XL_OPTS="--timeout 60 --admission-timeout 180"

# die TEXT: send the daemon logs so far, then fail.
die() {
    for log in /tmp/daemon-*.log; do
        [ -f "$log" ] && e2e_put "failed-$(basename "$log")" "$log"
    done
    e2e_fail "$@"
}

# stop_daemon SIGNAL: signal the daemon and wait until it is gone.
stop_daemon() {
    pid=$(cat "$PIDFILE")
    kill "-$1" "$pid"
    e2e_wait_for 60 "daemon $pid exited" sh -c "! kill -0 $pid" || die "daemon still runs"
}

# watch_states OUT NODE...: record every value the nodes take (polled 5 times a second), in the
# background, until stop_watch OUT.
watch_states() {
    out=$1
    shift
    rm -f "$out.stop"
    (
        while [ ! -e "$out.stop" ]; do
            for node in "$@"; do
                echo "$node = $(xenstore-read "$node" 2>/dev/null || echo absent)"
            done
            sleep 0.2
        done | uniq >"$out"
    ) &
    WATCH_PID=$!
}

# stop_watch OUT: stop the recorder and wait until it has written OUT in full (uniq writes at
# its end: a file sent before then arrives empty and grows while it is framed).
stop_watch() {
    touch "$1.stop"
    wait "$WATCH_PID"
}

guest_up() {
    e2e_wait_for 120 "guest $1 control/feature-poweroff" \
        xenstore-read "/local/domain/$1/control/feature-poweroff"
}

mkdir -p /run/shyped /var/lib/xen/images
host_alternatives
dd if=/dev/zero of=/var/lib/xen/images/green.img bs=1M count=8 2>/dev/null
xenstore-ls -fp | e2e_put layout-before-daemon.txt

e2e_step "daemon (enforcing)"
start_daemon "$F/shyped.toml" /tmp/daemon-1.log
xenstore-ls -fp | e2e_put layout-before-create.txt

# ---------------------------------------------------------------- 1. green: permitted
e2e_step "1: shype-xl create -p green"
# shellcheck disable=SC2086
e2e_run green-create.log e2e_host shype-xl $XL_OPTS create -p "$F/green.cfg" ||
    die "shype-xl create green"
G=$(domid green) || die "green not listed"
echo "$G" | e2e_put green.domid
e2e_wait_for 60 "green console tty" xenstore-read "/local/domain/$G/console/tty" ||
    die "no console tty"
e2e_wait_for 60 "green vif InitWait" e2e_xs_is "$BE/vif/$G/0/state" 2 || die "vif backend"
e2e_wait_for 60 "green vbd InitWait" e2e_xs_is "$BE/vbd/$G/51712/state" 2 || die "vbd backend"
sleep 1
xenstore-ls -fp | e2e_put layout-green-paused.txt
e2e_run xl-list-green-paused.txt xl list
e2e_run green-unpause.log xl unpause green || die "xl unpause green"
for node in "/local/domain/$G/device/vif/0" "$BE/vif/$G/0" \
    "/local/domain/$G/device/vbd/51712" "$BE/vbd/$G/51712"; do
    e2e_wait_for 120 "$node/state = 4" e2e_xs_is "$node/state" 4 || die "$node"
done
guest_up "$G" || die "green never wrote its control features"
sleep 2
xenstore-ls -fp | e2e_put layout-green-connected.txt
states green-vif.txt "$G" vif 0
states green-vbd.txt "$G" vbd 51712
e2e_run xl-list-green.txt xl list

# ---------------------------------------------------------------- 2. red: Chinese Wall
e2e_step "2: xl create -p red (conflicts with green)"
e2e_run red-create.log xl create -p "$F/red.cfg"
e2e_wait_for 120 "red destroyed" sh -c '! xl domid red' || die "red not destroyed"
sleep 2
e2e_run xl-list-after-red.txt xl list
states green-vif-after-red.txt "$G" vif 0
states green-vbd-after-red.txt "$G" vbd 51712

# ---------------------------------------------------------------- 3. blue: STE-violating vif
e2e_step "3: xl create -p blue (vif on green's bridge)"
e2e_run blue-create.log xl create -p "$F/blue.cfg" || die "xl create blue"
B=$(domid blue) || die "blue not listed"
echo "$B" | e2e_put blue.domid
watch_states /tmp/blue-vif-watch.txt "/local/domain/$B/device/vif/0/state" \
    "$BE/vif/$B/0/state" "$BE/vif/$B/0/online"
e2e_wait_for 120 "blue label node" xenstore-read "/local/domain/$B/shyped/label" ||
    die "blue not admitted"
# The veto: online=0, Closing, then (the paused guest cannot close) removal after the timeout.
e2e_wait_for 120 "blue vif removed" sh -c "! xenstore-exists $BE/vif/$B/0" ||
    die "blue's vif was not removed"
e2e_run blue-unpause.log xl unpause blue || die "xl unpause blue"
guest_up "$B" || die "blue never wrote its control features"
sleep 5
stop_watch /tmp/blue-vif-watch.txt
e2e_put blue-vif-watch.txt /tmp/blue-vif-watch.txt
states blue-vif.txt "$B" vif 0
e2e_run xl-list-blue.txt xl list

# ---------------------------------------------------------------- 4. restart: reconcile
e2e_step "4: daemon killed, red2 created, daemon restarted"
stop_daemon KILL
e2e_put daemon-1.log /tmp/daemon-1.log
e2e_run red2-create.log xl create -p "$F/red2.cfg" || die "xl create red2"
e2e_run xl-list-daemon-down.txt xl list
start_daemon "$F/shyped.toml" /tmp/daemon-2.log
e2e_wait_for 120 "red2 destroyed" sh -c '! xl domid red2' || die "red2 not destroyed"
sleep 2
e2e_run xl-list-after-restart.txt xl list
states green-vif-after-restart.txt "$G" vif 0
states green-vbd-after-restart.txt "$G" vbd 51712
stop_daemon TERM
e2e_put daemon-2.log /tmp/daemon-2.log

# ---------------------------------------------------------------- 5. permissive
e2e_step "5: permissive daemon, xl create -p blue2"
start_daemon "$F/shyped-permissive.toml" /tmp/daemon-3.log
e2e_run blue2-create.log xl create -p "$F/blue2.cfg" || die "xl create blue2"
B2=$(domid blue2) || die "blue2 not listed"
echo "$B2" | e2e_put blue2.domid
e2e_wait_for 120 "blue2 label node" xenstore-read "/local/domain/$B2/shyped/label" ||
    die "blue2 not admitted"
e2e_wait_for 120 "blue2 vif decided" grep -q "device vif $B2/0" /tmp/daemon-3.log ||
    die "blue2's vif not decided"
e2e_run blue2-unpause.log xl unpause blue2 || die "xl unpause blue2"
for node in "/local/domain/$B2/device/vif/0" "$BE/vif/$B2/0"; do
    e2e_wait_for 120 "$node/state = 4" e2e_xs_is "$node/state" 4 || die "$node"
done
sleep 2
states blue2-vif.txt "$B2" vif 0
e2e_run xl-list-permissive.txt xl list
stop_daemon TERM
e2e_put daemon-3.log /tmp/daemon-3.log

e2e_put labels-after.json "$F/labels.json"
e2e_put xenstored-access.log /var/log/xen/xenstored-access.log
dmesg | e2e_put dmesg.txt
e2e_step "done"
