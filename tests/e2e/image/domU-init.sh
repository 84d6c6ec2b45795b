#!/bin/sh
# /init of the e2e domU (busybox initramfs, PV guest).  Loads the PV frontends, which connect
# to dom0's backends on their own (vif: state 1 -> 4, vbd: 1 -> 3 -> 4), then idles.
# Its console is the PV console (hvc0 -> xenconsoled in dom0, which logs it to
# /var/log/xen/console/guest-<name>.log).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
kver=$(uname -r)
while read -r mod; do
    insmod "/lib/modules/$kver/$mod" || echo "domU: insmod $mod failed"
done </etc/shyped-e2e/modules
echo "domU: up"
# The FLASK scenarios' guest program (guestprog/xenpeer.c): only when the cfg's extra= asks.
if grep -qw xenpeer=serve /proc/cmdline; then
    /usr/bin/xenpeer serve &
fi
while :; do sleep 3600; done
