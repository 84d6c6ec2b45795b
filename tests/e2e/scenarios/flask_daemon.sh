# The daemon on the FLASK Xen (test_e2e_flask_daemon.py): Xen 4.17.7 with FLASK, booted with
# flask=enforcing and tests/e2e/flask/policy.toml compiled as its boot policy; shyped (real xl,
# dom0's oxenstored, enforcing, [flask] pointing at the Xen source) detects FLASK and loads its
# own compilation of the same policy.
#   1. shyped's view at start (status, log);
#   2. alpha and gamma created with shype-xl (cfgs carry ACM seclabels: shype-xl must hand xl
#      their FLASK contexts); beta with plain `xl create -p` (no seclabel: Xen builds it
#      unlabelled) relabelled by the daemon from the label store before its admission;
#   3. alpha and beta (share "shared") bind and map; gamma and alpha (share nothing) are
#      refused by Xen, and the daemon's audit trail records the denials;
#   3b. `shypectl addlabel gamma mgt alpha` (xm's relabel of a running domain): Xen relabels
#      alpha first (xl list -Z), alpha keeps its xenstore/console channels, a port it offers
#      beta is refused; relabelled back to alpha, the same offer works;
#   4. a policy Xen refuses (the daemon's copy of Xen's policy tree broken on purpose):
#      both keep 1.0, alpha and beta still bind;
#   5. `shypectl policy load` of 1.2 (alpha and beta share nothing): both switch, a new port
#      between them is refused.
# Updates are loaded by rewriting the configured policy file and `shypectl policy load` with no
# FILE (the daemon re-reads it): a FILE is parsed in a worker limited to 2 s of CPU, which
# Python's start-up alone exceeds under QEMU's TCG.
# Port and grant numbers pass through dom0 (guest console, a xenstore node only the peer reads),
# as in flask.sh.  Every check is made by the host on the result files; this script fails only
# when a step cannot go on.  Sourced by /job/run after e2e-lib.sh
# and scenario-lib.sh; cwd is /job/files.
set -u
F=$E2E_FILES
LOG=/tmp/daemon.log
XL_OPTS="--timeout 60 --admission-timeout 180"

[ "${E2E_XEN:-}" = flask ] || e2e_fail "this scenario needs the FLASK Xen (E2E_XEN=$E2E_XEN)"

die() {
    [ -f "$LOG" ] && e2e_put failed-daemon.log "$LOG"
    xl dmesg 2>&1 | e2e_put failed-xl-dmesg.txt
    e2e_fail "$@"
}

ctl() { e2e_host shypectl --json "$@"; }

mkdir -p /run/shyped
xl dmesg -c >/dev/null 2>&1

e2e_step "1: daemon (enforcing) on the FLASK Xen"
start_daemon "$F/shyped.toml" "$LOG" 300
ctl status >/tmp/status-start.json 2>&1
e2e_put status-start.json /tmp/status-start.json

e2e_step "2: shype-xl create alpha, gamma; xl create -p beta"
for g in alpha gamma; do
    # shellcheck disable=SC2086
    e2e_run "create-$g.log" e2e_host shype-xl $XL_OPTS create "$F/$g.cfg" || die "shype-xl $g"
done
e2e_run create-beta.log xl create -p "$F/beta.cfg" || die "xl create -p beta"
B=$(domid beta) || die "beta not listed"
e2e_wait_for 120 "beta admitted" xenstore-read "/local/domain/$B/shyped/label" ||
    die "beta not admitted"
e2e_run xl-list-Z-beta-paused.txt xl list -Z
e2e_run unpause-beta.log xl unpause beta || die "xl unpause beta"
for g in alpha beta gamma; do
    peer_setup "$g"
    domid "$g" | e2e_put "$g.domid"
done
e2e_run xl-list-Z.txt xl list -Z
ctl list >/tmp/list.json 2>&1
e2e_put list.json /tmp/list.json
A=$(domid alpha)
G=$(domid gamma)

e2e_step "3: alpha and beta share a type; gamma and alpha none"
peer alpha 1 offer "$B"
peer beta 2 take "$A" "$(value 1 port)" "$(value 1 gref)"
peer gamma 3 offer "$A"
peer alpha 4 take "$G" "$(value 3 port)" "$(value 3 gref)"
sleep 3 # the daemon reads Xen's console ring every second
xl dmesg >/tmp/xl-dmesg-1.txt 2>&1
e2e_put xl-dmesg-1.txt /tmp/xl-dmesg-1.txt

e2e_step "3b: shypectl relabel of running alpha to gamma (Xen first), and back"
e2e_run relabel-gamma.json ctl addlabel gamma mgt alpha
e2e_run xl-list-Z-relabelled.txt xl list -Z
peer alpha 8 offer "$B" # as gamma alpha shares nothing with beta: Xen refuses the port
e2e_run relabel-alpha.json ctl addlabel alpha mgt alpha
e2e_run xl-list-Z-back.txt xl list -Z
peer alpha 9 offer "$B" # alpha again: allowed

e2e_step "4: a policy Xen refuses"
AV=$(ls -d /tmp/shyped-flask-cache/*/xen/xsm/flask/policy)/access_vectors
cp "$AV" /tmp/access_vectors.good || die "no cached policy tree"
sed -i 's/^    reset$/    reset_refused_by_xen/' "$AV"
cp "$F/policy-1.1.toml" "$F/policy.toml" # the configured file: re-read by the daemon itself
e2e_run load-1.1.json ctl policy load
cp /tmp/access_vectors.good "$AV"
ctl status >/tmp/status-refused.json 2>&1
e2e_put status-refused.json /tmp/status-refused.json
xl dmesg >/tmp/xl-dmesg-2.txt 2>&1
e2e_put xl-dmesg-2.txt /tmp/xl-dmesg-2.txt
peer alpha 5 offer "$B"
peer beta 6 take "$A" "$(value 5 port)" "$(value 5 gref)"

e2e_step "5: policy 1.2: alpha and beta share nothing"
cp "$F/policy-1.2.toml" "$F/policy.toml"
e2e_run load-1.2.json ctl policy load
ctl status >/tmp/status-switched.json 2>&1
e2e_put status-switched.json /tmp/status-switched.json
peer alpha 7 offer "$B"
sleep 3
xl dmesg >/tmp/xl-dmesg-3.txt 2>&1
e2e_put xl-dmesg-3.txt /tmp/xl-dmesg-3.txt

e2e_step "stop"
pid=$(cat "$PIDFILE")
kill -TERM "$pid"
e2e_wait_for 60 "daemon exited" sh -c "! kill -0 $pid" || die "daemon still runs"
e2e_put daemon.log "$LOG"
cat /tmp/shyped-audit/audit-*.jsonl >/tmp/audit.txt 2>/dev/null
e2e_put audit.txt /tmp/audit.txt
e2e_run audit-verify.txt e2e_host shypectl audit --dir /tmp/shyped-audit verify
for g in alpha beta gamma; do
    xl destroy "$g" >/dev/null 2>&1
done
e2e_step "done"
