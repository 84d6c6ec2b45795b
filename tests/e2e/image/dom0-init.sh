#!/bin/sh
# /init of the e2e dom0 (busybox initramfs, PV dom0 under Xen 4.17 in QEMU).
# Brings up what Debian's /etc/init.d/xen does (xenfs, oxenstored, xen-init-dom0, xenconsoled),
# a bridge for vifs, then runs /job/run (the runner's scenario, appended to this initramfs as
# a second cpio archive) and powers the machine off.  Everything it reports goes to the console
# (hvc0 -> Xen -> com1 -> the runner's serial log) as "@@E2E ..." lines; see e2e-lib.sh.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
# The hotplug scripts (bash, locking.sh) use /dev/fd/N and /dev/stdin; no udev here.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /run/lock /run/xen /run/xenstored /var/log/xen /var/lib/xen/images /var/lib/xen/dump

. /usr/lib/shyped-e2e/lib.sh
echo "@@E2E INIT $(cut -d' ' -f1 /proc/uptime)"

die() {
    echo "@@E2E FAIL $*"
    dmesg | tail -n 40
    poweroff -f
    sleep 60
}

# Kernel messages after this point would interleave with the result lines.
dmesg -n 1
hostname dom0

# Modules, in dependency order (the builder resolved modinfo depends=).
kver=$(uname -r)
while read -r mod; do
    insmod "/lib/modules/$kver/$mod" || die "insmod $mod"
done </etc/shyped-e2e/modules
e2e_step "modules loaded"

syslogd -O /var/log/messages

mount -t xenfs xenfs /proc/xen || die "mount xenfs"
[ -f /job/env ] && . /job/env

if [ -n "$E2E_HOST_SHARE" ]; then
    mkdir -p /host
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 \
        "$E2E_HOST_SHARE" /host || die "mount 9p $E2E_HOST_SHARE"
fi

# xencommons order (Debian /etc/init.d/xen): xenstored, xen-init-dom0, xenconsoled.
XENBIN=/usr/lib/xen-4.17/bin
"$XENBIN/oxenstored" --pid-file /run/xen/xenstored.pid \
    --config-file /etc/shyped-e2e/oxenstored.conf || die "oxenstored"
e2e_wait_for 30 "xenstored answers" xenstore-read -s / || die "xenstored did not come up"
"$XENBIN/xen-init-dom0" >/dev/null || die "xen-init-dom0"
# Guest consoles are logged (/var/log/xen/console/guest-<name>.log): scenarios read what
# guest programs print there.
mkdir -p /var/log/xen/console
"$XENBIN/xenconsoled" --pid-file /run/xenconsoled.pid --log=guest \
    --log-dir=/var/log/xen/console || die "xenconsoled"
ip link add name xenbr0 type bridge stp_state 0 forward_delay 0 || die "bridge"
ip link set xenbr0 up || die "bridge up"
ip link set lo up
echo "@@E2E READY $(cut -d' ' -f1 /proc/uptime)"

rc=0
if [ -f /job/run ]; then
    timeout -s KILL "${E2E_SCENARIO_TIMEOUT:-600}" /bin/sh /job/run </dev/null
    rc=$?
else
    echo "no /job/run in the initramfs"
    rc=2
fi
if [ "$rc" != 0 ]; then
    # What anyone debugging a failed scenario looks at first.
    for f in /var/log/xen/*.log /var/log/xen/console/*.log /var/log/messages; do
        [ -f "$f" ] && e2e_put "diag${f}" "$f"
    done
    xenstore-ls -fp >/tmp/xenstore-ls.txt 2>&1 && e2e_put diag/xenstore-ls.txt /tmp/xenstore-ls.txt
    dmesg | e2e_put diag/dmesg.txt
fi
echo "@@E2E EXIT $rc"
sync
poweroff -f
sleep 60
