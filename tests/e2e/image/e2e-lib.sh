# Helpers for e2e scenarios (sourced by dom0's /init and by /job/run before the scenario).
# The console (hvc0) is the only channel back to the runner, so everything the host needs is
# printed as "@@E2E ..." lines, which runner.py parses:
#   @@E2E STEP <text>                        progress (shown in a hung scenario's error)
#   @@E2E FILE <name> <size> <sha256>        a result file follows,
#   @@E2E D <name> <seq> <base64 chunk>      its content, 57 bytes a line (seq from 1),
#   @@E2E EOF <name>                         and its end; the runner checks size and sha256.
#   @@E2E EXIT <rc>                          the scenario ended (printed by /init)
# Xen may splice its own console lines between ours; the checksum catches a damaged file.

E2E_FILES=/job/files

e2e_step() {
    echo "@@E2E STEP $*"
}

# e2e_put NAME [FILE]: send FILE (default: stdin) to the runner as result NAME.
e2e_put() {
    _name=$1
    _src=${2:-}
    if [ -z "$_src" ]; then
        _src=/tmp/.e2e-put.$$
        cat >"$_src"
    fi
    _size=$(wc -c <"$_src")
    _sum=$(sha256sum <"$_src" | cut -d' ' -f1)
    echo "@@E2E FILE $_name $_size $_sum"
    base64 -w 76 <"$_src" | awk -v n="$_name" '{ printf "@@E2E D %s %d %s\n", n, NR, $0 }'
    echo "@@E2E EOF $_name"
    [ -n "${2:-}" ] || rm -f "$_src"
}

# e2e_run NAME CMD...: run CMD, send its stdout+stderr as result NAME and its exit code as
# result NAME.rc; returns CMD's exit code.
e2e_run() {
    _rname=$1
    shift
    "$@" >/tmp/.e2e-run.$$ 2>&1
    _rc=$?
    e2e_put "$_rname" /tmp/.e2e-run.$$
    echo "$_rc" | e2e_put "$_rname.rc"
    rm -f /tmp/.e2e-run.$$
    return $_rc
}

# e2e_wait_for SECONDS WHAT CMD...: poll CMD (quietly) every 0.2 s until it succeeds.
e2e_wait_for() {
    _timeout=$1
    _what=$2
    shift 2
    _deadline=$(($(cut -d. -f1 /proc/uptime) + _timeout))
    while ! "$@" >/dev/null 2>&1; do
        if [ "$(cut -d. -f1 /proc/uptime)" -ge "$_deadline" ]; then
            echo "@@E2E STEP timeout after ${_timeout}s waiting for: $_what"
            return 1
        fi
        sleep 0.2
    done
    return 0
}

# e2e_xs_is PATH VALUE: xenstore node PATH holds VALUE.
e2e_xs_is() {
    [ "$(xenstore-read "$1" 2>/dev/null)" = "$2" ]
}

# e2e_fail TEXT: report and end the scenario with exit code 1.
e2e_fail() {
    echo "@@E2E STEP FAILED: $*"
    exit 1
}

# e2e_host CMD...: run CMD in a mount namespace where /usr and the paths in E2E_HOST_PATHS
# (the host's Python, the venv, the repository) are the host's own, read-only over virtio-9p,
# at the same paths.  So the venv's python, shyped's console scripts and the repo's files work
# unchanged, while /etc, /var, /run, /dev, /proc stay dom0's (xenstored socket, xl state).
# Xen tools then come from the host's /usr too (same Debian xen-utils-4.17 version; the
# builder records both versions).
e2e_host() {
    [ -d /host/usr ] || e2e_fail "e2e_host: host root not mounted (E2E_HOST_SHARE unset?)"
    unshare -m --propagation private /bin/sh -c '
        for p in $E2E_HOST_PATHS; do
            mkdir -p "$p" && mount -o bind "/host$p" "$p" || exit 97
        done
        mount -o bind /host/usr /usr || exit 97
        export PATH="${E2E_VENV:+$E2E_VENV/bin:}$PATH"
        exec "$@"' e2e_host "$@"
}
