# Hypervisor metering on real Xen (issue 16): shyped runs in dom0 with its metrics endpoint and
# libxenstat metering (tests/e2e/metering/shyped.toml: every 2 s); the guest "burner" spins its
# vCPU, the guest "io" pings dom0 over its vif and writes its vbd (tests/e2e/metering/
# work-init.sh, appended to the guest initramfs). The endpoint is scraped twice, 12 s apart,
# each time followed at once by `xl list` and `xentop -b -i 1`; the host test compares them.
# Sourced by /job/run after e2e-lib.sh and scenario-lib.sh; cwd is /job/files.
set -u
F=$E2E_FILES
URL=http://127.0.0.1:9474/metrics
XENTOP=$(command -v xentop || echo /usr/lib/xen-4.17/bin/xentop)

die() {
    [ -f /tmp/daemon.log ] && e2e_put failed-daemon.log /tmp/daemon.log
    e2e_fail "$@"
}

mkdir -p /run/shyped /var/lib/xen/images
ip addr add 10.99.0.1/24 dev xenbr0 2>/dev/null
ip link set xenbr0 up

e2e_step "guest initramfs with the work /init"
rm -rf /tmp/overlay && mkdir -p /tmp/overlay
cp "$F/work-init.sh" /tmp/overlay/init && chmod 755 /tmp/overlay/init
(cd /tmp/overlay && echo init | cpio -o -H newc 2>/dev/null | gzip) >/tmp/overlay.cpio.gz ||
    die "cannot build the overlay cpio"
cat /guest/initrd.gz /tmp/overlay.cpio.gz >/var/lib/xen/images/work-initrd.gz
dd if=/dev/zero of=/var/lib/xen/images/io.img bs=1M count=16 2>/dev/null

e2e_step "shyped with metrics"
start_daemon "$F/shyped.toml" /tmp/daemon.log

e2e_step "guests"
e2e_run xl-create-burner.log xl create "$F/burner.cfg" || die "xl create burner"
e2e_run xl-create-io.log xl create "$F/io.cfg" || die "xl create io"
IO=$(xl domid io)
BURNER=$(xl domid burner)
echo "$IO" | e2e_put io.domid
echo "$BURNER" | e2e_put burner.domid
for node in /local/domain/$IO/device/vif/0 /local/domain/0/backend/vif/$IO/0 \
    /local/domain/$IO/device/vbd/51712 /local/domain/0/backend/vbd/$IO/51712; do
    e2e_wait_for 180 "$node/state = 4" e2e_xs_is "$node/state" 4 || die "$node not connected"
done
# Keep dom0 responsive on the one emulated CPU: the burner may have a quarter of it.
e2e_run sched.txt xl sched-credit2 -d burner -c 25
e2e_wait_for 120 "metering up" sh -c "wget -q -O - $URL | grep -q 'shyped_xen_metering_up{source=\"xenstat\"} 1.0'" ||
    die "no metering"
sleep 4

for n in 1 2; do
    e2e_step "scrape $n"
    wget -q -O /tmp/scrape-$n.txt "$URL" || die "scrape $n"
    xl list >/tmp/xl-list-$n.txt 2>&1
    "$XENTOP" -b -i 1 -f >/tmp/xentop-$n.txt 2>&1
    for f in scrape-$n.txt xl-list-$n.txt xentop-$n.txt; do e2e_put "$f" "/tmp/$f"; done
    [ "$n" = 1 ] && sleep 12
done

e2e_step "stop"
kill -TERM "$(cat "$PIDFILE")"
e2e_wait_for 60 "daemon exited" sh -c "! kill -0 $(cat "$PIDFILE")" || die "daemon still runs"
e2e_put daemon.log /tmp/daemon.log
xl destroy burner
xl destroy io
exit 0
