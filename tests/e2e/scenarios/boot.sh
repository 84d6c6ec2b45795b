# Boot smoke test: the reference domain (xsgold.cfg, sent as a job file) on real Xen.
# Mirrors the capture in shared/xen-4.17-reference: xl create -p, layout, xl unpause, wait until
# vif and vbd are Connected on both ends, layout, xl list, destroy.  Also checks that the
# host's venv Python runs in dom0 and reaches xenstored (what the daemon scenarios need).
# Sourced by /job/run after e2e-lib.sh and scenario-lib.sh (BE, domid); cwd is /job/files.
set -u
CFG=$E2E_FILES/xsgold.cfg
[ -f "$CFG" ] || e2e_fail "no xsgold.cfg in the job files"
DOM=/local/domain/1
VIF_FE=$DOM/device/vif/0
VBD_FE=$DOM/device/vbd/51712
VIF_BE=$BE/vif/1/0
VBD_BE=$BE/vbd/1/51712

e2e_step "xl info"
e2e_run xl-info xl info || e2e_fail "xl info"
xenstore-ls -fp | e2e_put layout-before-create.txt

e2e_step "disk image and xl create -p"
dd if=/dev/zero of=/var/lib/xen/images/xsgold-xvda.img bs=1M count=8 2>/dev/null
e2e_run xl-create.log xl -vvv create -p "$CFG" || e2e_fail "xl create -p"
[ "$(domid xsgold)" = 1 ] || e2e_fail "xsgold is not domain 1"
# xl returns once the hotplug scripts are done; xenconsoled's tty write and the backends'
# InitWait come on their own, so wait for them before the dump (like the capture did).
e2e_wait_for 60 "console tty" xenstore-read $DOM/console/tty || e2e_fail "no console tty"
e2e_wait_for 60 "vif backend InitWait" e2e_xs_is $VIF_BE/state 2 || e2e_fail "vif backend"
e2e_wait_for 60 "vbd backend InitWait" e2e_xs_is $VBD_BE/state 2 || e2e_fail "vbd backend"
sleep 1
xenstore-ls -fp | e2e_put layout-paused.txt
e2e_run xl-list-paused.txt xl list

e2e_step "xl unpause"
e2e_run xl-unpause.log xl -vvv unpause xsgold || e2e_fail "xl unpause"
for node in $VIF_FE $VIF_BE $VBD_FE $VBD_BE; do
    e2e_wait_for 120 "$node/state = 4" e2e_xs_is $node/state 4 || e2e_fail "$node not connected"
done
e2e_wait_for 60 "guest control/feature-poweroff" xenstore-read $DOM/control/feature-poweroff ||
    e2e_fail "guest never wrote its control features"
sleep 2
xenstore-ls -fp | e2e_put layout-connected.txt
for node in $VIF_FE $VBD_FE $VIF_BE $VBD_BE; do
    echo "$node/state = $(xenstore-read $node/state)"
done | e2e_put states-connected.txt
e2e_run xl-list.txt xl list
e2e_run xl-list-l.json xl list -l

e2e_step "xl destroy"
e2e_run xl-destroy.log xl -vvv destroy xsgold || e2e_fail "xl destroy"
e2e_wait_for 60 "domain 1 gone from xenstore" sh -c "! xenstore-exists $DOM" ||
    e2e_fail "domain 1 left behind"
e2e_run xl-list-after-destroy.txt xl list
xenstore-ls -fp | e2e_put layout-after-destroy.txt

e2e_step "host venv python in dom0"
# shellcheck disable=SC2016
e2e_run python-in-dom0.txt e2e_host "$E2E_PYTHON" -c '
import sys, pyxs, shyped
print("python", sys.version.split()[0], sys.prefix)
print("shyped", shyped.__file__)
with pyxs.Client(unix_socket_path="/var/run/xenstored/socket") as c:
    print("dom0 name", c.read(b"/local/domain/0/name").decode())
'

# The daemon runs like this: host userland (its /usr, so the host's xl of the same version).
e2e_run xl-list-host-userland.txt e2e_host xl list

e2e_put xenstored-access.log /var/log/xen/xenstored-access.log
dmesg | e2e_put dmesg.txt
e2e_step "done"
