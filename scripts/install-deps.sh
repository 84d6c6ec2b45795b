#!/usr/bin/env bash
# Installs what shyped's sandbox, tests and demo need on Debian 12 (as root), and a venv in .venv.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
    xen-utils-4.17     # oxenstored, the real xenstore daemon
    xenstore-utils     # xenstore-ls, -write, -watch, -chmod
    gcc libc6-dev      # builds the sandbox preload library
    python3-venv
    graphviz           # policy graph rendering (optional at run time)
    prometheus         # promtool and a real Prometheus server for the metrics tests
    systemd            # systemd-analyze verify on the units
    qemu-system-x86    # e2e tier (tests/e2e): boots Debian's Xen 4.17 and a PV dom0 under TCG
    busybox-static     # e2e tier: the dom0/domU initramfs userland
    cpio               # e2e tier: initramfs archives
    iproute2           # e2e tier: `ip` in dom0 (bridge, vif-bridge hotplug script)
    m4 checkpolicy     # shypectl policy flask: Xen FLASK policy build (m4, checkpolicy -t Xen)
    flex bison         # e2e tier: builds Xen 4.17.7 with FLASK (tests/e2e/flaskxen.py)
    linux-libc-dev     # e2e tier: <xen/evtchn.h>, <xen/gntalloc.h>, <xen/gntdev.h> for the guest program
    setools            # FLASK compiler tests: read the binary policy back (sesearch, python3-setools)
    etcd-server etcd-client  # pool mode (shyped/pool): a real etcd cluster on loopback in the tests
    swtpm swtpm-tools tpm2-tools  # attestation (shyped/attest): a software TPM 2.0 and tpm2_quote/checkquote
    uidmap             # red team: newuidmap/newgidmap, a user connecting as its subordinate uids
    dpkg-dev debhelper dh-virtualenv  # scripts/build-deb.sh: the Debian package (tests/test_debian_package.py)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Debian prometheus package starts a server on :9090 at install; the tests run their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
fi
# Likewise etcd-server starts a single-member etcd on :2379; the pool tests run their own cluster.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl stop etcd || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
