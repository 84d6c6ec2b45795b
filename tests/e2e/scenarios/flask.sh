# Xen's own enforcement of the compiled sHype policy: Xen 4.17.7 built with FLASK, booted with
# flask=enforcing and tests/e2e/flask/policy.toml compiled by `shypectl policy flask` as its
# boot policy (test_e2e_flask.py).  No daemon: only Xen decides here.
#   1. Xen's view: getenforce, its boot lines, dom0's context;
#   2. guests alpha, beta (share the STE type "shared") and gamma (shares none), created with
#      seclabel = their label's FLASK type; `xl list -Z`;
#   3. alpha offers beta an unbound port and a granted page, beta binds, notifies, maps, copies,
#      replies; alpha sees the event and the reply (the guest program, guestprog/xenpeer.c);
#   4. gamma offers alpha the same, alpha takes; alpha offers gamma: Xen refuses each;
#   5. what libxl does with an unlabelled guest and with an ACM-style seclabel;
#   6. a run-time switch to tests/e2e/flask/policy-noshare.toml: a port alpha offered beta before
#      the switch can no longer be bound, a new one not allocated, the channel bound before
#      still carries events, and a new guest still boots.
# Port and grant numbers never pass between the guests: each guest prints them on its console
# (xenconsoled's log here) and takes commands from xenpeer/cmd under its own xenstore home,
# which this script writes and only that guest can read.  Every check is made by the host on
# the result files; this script fails only when a step cannot go on.
# Sourced by /job/run after e2e-lib.sh and scenario-lib.sh; cwd is /job/files.
set -u
F=$E2E_FILES

[ "${E2E_XEN:-}" = flask ] || e2e_fail "this scenario needs the FLASK Xen (E2E_XEN=$E2E_XEN)"

# mkcfg NAME [SECLABEL-LINE]: a minimal PV guest running the guest program.
mkcfg() {
    cat >"/tmp/$1.cfg" <<EOF
name = "$1"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0 rdinit=/init loglevel=4 xenpeer=serve"
memory = 128
vcpus = 1
${2:-}
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "preserve"
EOF
}

e2e_step "Xen's view at boot"
e2e_run xl-getenforce.txt xl getenforce
xl dmesg >/tmp/xl-dmesg-boot.txt 2>&1
e2e_put xl-dmesg-boot.txt /tmp/xl-dmesg-boot.txt
xl dmesg -c >/dev/null 2>&1 # from here on, the ring holds only what the guests caused
e2e_run xl-list-Z-dom0.txt xl list -Z

e2e_step "labelled guests"
for g in alpha beta gamma; do
    mkcfg "$g" "seclabel = \"system_u:system_r:shype_${g}_t\""
    e2e_run "xl-create-$g.log" xl -vvv create "/tmp/$g.cfg" || e2e_fail "xl create $g"
done
for g in alpha beta gamma; do
    peer_setup "$g"
    domid "$g" | e2e_put "$g.domid"
done
e2e_run xl-list-Z.txt xl list -Z
A=$(domid alpha)
B=$(domid beta)
G=$(domid gamma)

e2e_step "alpha and beta share a type"
peer alpha 1 offer "$B"
peer beta 2 take "$A" "$(value 1 port)" "$(value 1 gref)"
sleep 1
peer alpha 3 check

e2e_step "gamma and alpha share none"
peer gamma 4 offer "$A"
peer alpha 5 take "$G" "$(value 4 port)" "$(value 4 gref)"
peer alpha 6 offer "$G"
xl dmesg >/tmp/xl-dmesg.txt 2>&1
e2e_put xl-dmesg.txt /tmp/xl-dmesg.txt

e2e_step "unlabelled guest (no seclabel)"
mkcfg plain
e2e_run xl-create-plain.log timeout 120 xl -vvv create /tmp/plain.cfg
e2e_run xl-list-Z-plain.txt xl list -Z
xl destroy plain >/dev/null 2>&1

e2e_step "ACM-style seclabel"
mkcfg acm 'seclabel = "ACM:e2e.flask:alpha"'
e2e_run xl-create-acm.log timeout 120 xl -vvv create /tmp/acm.cfg
xl destroy acm >/dev/null 2>&1
xl dmesg -c >/tmp/xl-dmesg-unlabelled.txt 2>&1
e2e_put xl-dmesg-unlabelled.txt /tmp/xl-dmesg-unlabelled.txt

if [ -f "$F/xenpolicy-noshare" ]; then
    e2e_step "run-time switch to a policy where alpha and beta share nothing"
    peer alpha 7 offer "$B"
    e2e_run xl-loadpolicy.txt xl loadpolicy "$F/xenpolicy-noshare"
    e2e_run xl-getenforce-after.txt xl getenforce
    peer beta 8 take "$A" "$(value 7 port)" "$(value 7 gref)"
    peer alpha 9 offer "$B"
    # The channel bound under the old policy (command 2) still carries events: a switch
    # refuses new channels, it does not close established ones.
    peer beta 10 notify
    sleep 1
    peer alpha 11 check
    # dom0 still serves its guests after the switch: a new guest boots and talks to xenstore.
    mkcfg late "seclabel = \"system_u:system_r:shype_beta_t\""
    e2e_run xl-create-late.log timeout 120 xl -vvv create /tmp/late.cfg
    e2e_wait_for 60 "late runs xenpeer" grep -q "XENPEER - serving" "$CONSOLE/guest-late.log"
    echo $? | e2e_put late-serving.rc
    xl dmesg >/tmp/xl-dmesg-switch.txt 2>&1
    e2e_put xl-dmesg-switch.txt /tmp/xl-dmesg-switch.txt
fi

e2e_step "destroy"
for g in alpha beta gamma late; do
    xl destroy "$g" >/dev/null 2>&1
done
e2e_run xl-list-after.txt xl list -Z
for f in "$CONSOLE"/guest-*.log; do
    e2e_put "console-$(basename "$f")" "$f"
done
e2e_step "done"
