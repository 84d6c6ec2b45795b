#!/bin/sh
# /init of the metering scenario's guests, appended to the e2e domU initramfs as a second cpio
# archive (the kernel unpacks both; this /init wins). As image/domU-init.sh, then the work the
# kernel command line asks for: e2e_work=burn spins, e2e_work=io pings dom0 over the vif and
# writes the vbd, again and again.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
kver=$(uname -r)
while read -r mod; do
    insmod "/lib/modules/$kver/$mod" || echo "domU: insmod $mod failed"
done </etc/shyped-e2e/modules
echo "domU: up"
case " $(cat /proc/cmdline) " in
*" e2e_work=burn "*)
    echo "domU: burning CPU"
    while :; do :; done
    ;;
*" e2e_work=io "*)
    ip link set eth0 up
    ip addr add 10.99.0.2/24 dev eth0
    echo "domU: vif and vbd traffic"
    while :; do
        ping -c 10 -i 0.2 -s 1000 -W 1 10.99.0.1 >/dev/null 2>&1
        dd if=/dev/zero of=/dev/xvda bs=64k count=16 conv=fsync 2>/dev/null
        sleep 1
    done
    ;;
esac
while :; do sleep 3600; done
