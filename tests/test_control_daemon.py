"""shypectl and shype-xl against the REAL daemon (``shyped --config …`` as a child process) on a
sandbox host: real oxenstored, the sandbox toolstack as xl. Every command is run as an
operator runs it (a subprocess), and its output and exit status are checked against what the
daemon then does in xenstore and to the domains."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_daemon_helpers import (
    HOSTING,
    POLICY,
    PY,
    Host,
    acm,
    image,
    sandbox_host,
    uuid_of,
)
from process_helpers import ShypedProcess, wait_until

from shyped.control import backend as b
from shyped.control.client import ControlClient
from shyped.control.daemon_backend import DaemonControlBackend
from shyped.control.protocol import ControlError, ErrorCode
from shyped.core.labelstore import LabelStore
from shyped.core.xlcfg import domain_config_from_text
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.service.config import ActuatorConfig, Config, ControlConfig, XenstoreConfig
from shyped.service.daemon import Daemon, load_policy


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[Host]:
    """A sandbox host; each test starts the daemon when it wants it."""
    with sandbox_host(xenstored) as h:
        yield h


BANK_A_DISK = (image("web-a1"),)
BANK_A_VIF = ("bridge=xenbr-bank-a",)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    """stdout of a command that must have succeeded."""
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def create(
    host: Host,
    name: str,
    label: str,
    disks: tuple[str, ...] = (),
    vifs: tuple[str, ...] = (),
) -> int:
    """Create a domain through shype-xl (admitted and unpaused); its domid."""
    cfg = host.cfg(name, label, disks=disks, vifs=vifs)
    r = host.shype_xl("create", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"domain {name} (domid " in r.stderr and "admitted" in r.stderr
    return host.domid(name)


def listing(host: Host) -> dict[str, tuple[str, str]]:
    """``shypectl list``: name -> (state, label)."""
    rows = ok(host.ctl("list")).splitlines()[1:]
    return {r.split()[0]: (r.split()[4], r.split()[6]) for r in rows}


# --------------------------------------------------------------------------- reading


def test_status_labels_list_getlabel_and_resources(host: Host) -> None:
    host.start()
    out = ok(host.ctl("status"))
    assert "mode:       enforcing" in out
    assert f"policy:     {POLICY} 1.0 (toml)" in out
    assert "ready:      yes" in out
    assert "domains:    1 (1 admitted" in out  # dom0

    vm = ok(host.ctl("labels", "--type", "vm")).split()
    assert vm == ["dom0", "netdom", "bank-a-web", "bank-a-batch", "bank-a-reports",
                  "bank-b-web", "shop"]  # fmt: skip
    long = ok(host.ctl("labels", "--type", "any", "-l")).splitlines()
    assert "vm  dom0  ste=bank-a,bank-b,net-infra,system,web cw=system bootstrap" in long
    assert "res xenbr-bank-a  ste=bank-a" in long

    a1 = create(host, "web-a1", "bank-a-web", disks=BANK_A_DISK, vifs=BANK_A_VIF)
    assert host.xl_list()["web-a1"].find("p") == -1  # unpaused
    assert listing(host) == {
        "Domain-0": ("admitted", acm("dom0")),
        "web-a1": ("admitted", acm("bank-a-web")),
    }
    for ref in ("web-a1", str(a1), uuid_of("web-a1")):
        assert ok(host.ctl("getlabel", "dom", ref)).strip() == acm("bank-a-web")
    r = host.ctl("getlabel", "dom", "no-such-domain")
    assert r.returncode == 5 and "not-found" in r.stderr

    disk = "file:/srv/xen/images/web-a1.img"
    assert ok(host.ctl("getlabel", "res", disk)).strip() == acm("bank-a-disk")
    assert ok(host.ctl("getlabel", "res", "bridge:nobody")).strip() == "(unlabelled)"
    r = host.ctl("getlabel", "res", "relative/path.img")
    assert r.returncode == 2 and "invalid-argument" in r.stderr

    res = dict(line.split() for line in ok(host.ctl("resources")).splitlines())
    assert res["disk:/srv/xen/images/web-a1.img"] == acm("bank-a-disk")
    assert res["bridge:xenbr-public"] == acm("xenbr-public")
    assert len(res) == 8

    st = json.loads(ok(host.ctl("--json", "status")))
    assert st["ready"] is True
    assert st["counts"]["admitted"] == 2 and st["counts"]["devices"] == 3  # vbd, vif, console


# --------------------------------------------------------------------------- labelling


def test_addlabel_and_rmlabel_for_a_cfg_a_resource_and_a_running_domain(host: Host) -> None:
    host.start()
    cfg = host.cfg("web-b1")
    out = ok(host.ctl("addlabel", "bank-b-web", "dom", str(cfg)))
    assert out.strip() == f"{cfg}: seclabel = {acm('bank-b-web')}"
    assert f'seclabel = "{acm("bank-b-web")}"' in cfg.read_text()
    r = host.ctl("addlabel", "no-such-label", "dom", str(cfg))
    assert r.returncode == 6 and "no VM label 'no-such-label'" in r.stderr
    assert acm("bank-b-web") in cfg.read_text()  # unchanged
    assert ok(host.ctl("rmlabel", "dom", str(cfg))).strip() == f"{cfg}: unlabelled"
    assert "seclabel" not in cfg.read_text()

    out = ok(host.ctl("addlabel", "xenbr-public", "res", "bridge:xenbr-test"))
    assert out.strip() == f"bridge:xenbr-test: {acm('xenbr-public')} (was unlabelled)"
    assert json.loads(host.labels.read_text())["resources"]["bridge:xenbr-test"] == "xenbr-public"
    assert ok(host.ctl("getlabel", "res", "bridge:xenbr-test")).strip() == acm("xenbr-public")
    out = ok(host.ctl("rmlabel", "res", "bridge:xenbr-test"))
    assert out.strip() == f"bridge:xenbr-test: unlabelled (was {acm('xenbr-public')})"
    assert "bridge:xenbr-test" not in json.loads(host.labels.read_text())["resources"]

    # A resource in use keeps only labels its users may use; a refusal changes nothing.
    create(host, "web-a1", "bank-a-web", disks=BANK_A_DISK, vifs=BANK_A_VIF)
    before = host.labels.read_bytes()
    r = host.ctl("addlabel", "xenbr-bank-b", "res", "bridge:xenbr-bank-a")
    assert r.returncode == 1 and "[denied]" in r.stderr
    assert "in use (read-write) by domain 'web-a1'" in r.stderr
    assert host.labels.read_bytes() == before
    assert ok(host.ctl("getlabel", "res", "bridge:xenbr-bank-a")).strip() == acm("xenbr-bank-a")

    # addlabel mgt: relabel the running domain (same types and level: allowed).
    out = ok(host.ctl("addlabel", "bank-a-batch", "mgt", "web-a1"))
    assert out.strip() == f"web-a1 (domid {host.domid('web-a1')}): {acm('bank-a-batch')}"
    assert host.label_node("web-a1") == acm("bank-a-batch")
    assert json.loads(host.labels.read_text())["domains"]["uuid"][uuid_of("web-a1")] == (
        "bank-a-batch"
    )
    assert ok(host.ctl("getlabel", "dom", "web-a1")).strip() == acm("bank-a-batch")
    assert "relabel: web-a1(" in host.log() and "bank-a-web -> bank-a-batch" in host.log()


def test_a_relabel_that_breaks_the_chinese_wall_or_a_live_channel_changes_nothing(
    host: Host,
) -> None:
    host.start()
    create(host, "web-a1", "bank-a-web")
    create(host, "batch-a1", "bank-a-batch")
    create(host, "shop-1", "shop")
    server, client = host.domid("web-a1"), host.domid("batch-a1")
    vchan = host.ts.vchan_listen(server, client, port=7)
    wait_until(lambda: f"decision: permit vchan {vchan.path}" in host.log())

    def state() -> tuple[object, ...]:
        nodes = tuple(host.label_node(n) for n in ("web-a1", "batch-a1", "shop-1"))
        return (host.labels.read_bytes(), nodes, listing(host), host.xl_list(),
                ok(host.ctl("--json", "status")).replace('"ready": true', ""))  # fmt: skip

    before = state()
    # shop-1 as a bank-b domain: Chinese Wall conflict with the running bank-a domains.
    r = host.ctl("addlabel", "bank-b-web", "mgt", "shop-1")
    assert r.returncode == 1, r.stderr
    assert "relabel of shop-1" in r.stderr and "[denied]" in r.stderr
    assert "[chinese-wall]" in r.stderr and "conflicts with running type 'bank-a'" in r.stderr
    assert state() == before

    # batch-a1 as bank-a-reports ("internal"): its live vchan with the confidential web-a1
    # would be denied (MLS: a two-way channel needs equal levels).
    r = host.ctl("addlabel", "bank-a-reports", "mgt", "batch-a1")
    assert r.returncode == 1, r.stderr
    assert "[channel] live vchan channel between domain 'web-a1'" in r.stderr
    assert "[mls]" in r.stderr
    assert state() == before

    # dom0 (the same checks as any running domain: its live channels to every guest) and
    # unknown labels
    r = host.ctl("addlabel", "shop", "mgt", "0")
    assert r.returncode == 1 and "relabel of Domain-0 (domid 0) to shop denied" in r.stderr
    assert "[channel] live console channel between domain 'web-a1'" in r.stderr
    r = host.ctl("addlabel", "nope", "mgt", "shop-1")
    assert r.returncode == 6 and "unknown label 'nope'" in r.stderr
    assert state() == before
    assert "relabel:" not in host.log()


# --------------------------------------------------------------------------- dry run vs daemon


def reason_of(dry_run_out: str, item: str) -> str:
    """The policy's reason of one DENIED item of ``shypectl dry-run`` (after ``[rule]: ``)."""
    line = next(li for li in dry_run_out.splitlines() if li.startswith(item))
    assert "DENIED" in line, line
    return line.split("]: ", 1)[1]


def test_dry_run_agrees_with_what_the_daemon_then_does(host: Host) -> None:
    host.start()
    # Permitted: dry-run says so, shype-xl creates it, the daemon admits it and it runs.
    a1 = host.cfg("web-a1", "bank-a-web", disks=BANK_A_DISK, vifs=BANK_A_VIF)
    out = ok(host.ctl("dry-run", str(a1)))
    assert out.splitlines()[-1] == "PERMITTED"
    assert sum("PERMITTED" in li for li in out.splitlines()) == 4  # domain, disk, vif, total
    r = host.shype_xl("create", str(a1))
    assert r.returncode == 0, r.stderr
    assert f"admitted ({acm('bank-a-web')})" in r.stderr
    assert "p" not in host.xl_list()["web-a1"]
    assert host.label_node("web-a1") == acm("bank-a-web")

    # Denied by the Chinese Wall: dry-run and shype-xl refuse; nothing is created ...
    b1 = host.cfg("web-b1", "bank-b-web", disks=[image("web-b1")])
    r = host.ctl("dry-run", str(b1))
    assert r.returncode == 1 and r.stdout.splitlines()[-1] == "DENIED"
    cw = reason_of(r.stdout, "domain web-b1")
    assert "conflicts with running type 'bank-a'" in cw
    r = host.shype_xl("create", str(b1))
    assert r.returncode == 1 and "DENIED by shyped (nothing created)" in r.stderr
    assert cw in r.stderr
    assert "web-b1" not in host.xl_list()
    # ... and the same cfg created behind shyped's back is destroyed for the same reason.
    assert host.xl("create", str(b1)).returncode == 0
    wait_until(lambda: "web-b1" not in host.xl_list(), what="web-b1 destroyed")
    assert f"[chinese-wall] {cw} -> destroy domain" in host.log()

    # Denied for a device: the shop (labelled by name in the store) with bank A's disk.
    s1 = host.cfg("shop-1", "shop", disks=[image("web-a1")])
    r = host.ctl("dry-run", str(s1))
    assert r.returncode == 1
    assert "PERMITTED" in next(li for li in r.stdout.splitlines() if li.startswith("domain"))
    disk = reason_of(r.stdout, "disk xvda")
    assert "lacks STE type 'bank-a'" in disk
    assert host.xl("create", str(s1)).returncode == 0
    wait_until(lambda: f"{disk} -> cut vbd" in host.log(), what="the disk cut")
    s1_disk = f"/libxl/{host.domid('shop-1')}/device/vbd/51712"
    wait_until(lambda: host.read(s1_disk + "/backend") is None, what="the disk removed")
    assert listing(host)["shop-1"] == ("admitted", acm("shop"))  # the domain itself runs


def test_shype_xl_destroys_a_domain_the_daemon_refuses_at_admission(host: Host) -> None:
    """The dry run passed, but a competitor started before the domain appeared (an xl that
    starts one first): the daemon refuses admission, shype-xl destroys the domain, says why,
    exits 1 and forgets the label it registered."""
    host.start()
    rival = host.cfg("web-b1")  # labelled bank-b-web by name in the label store
    racing_xl = host.directory / "racing-xl.py"
    racing_xl.write_text(
        "import subprocess, sys, json, time\n"
        f"XL = {host.xl_argv()!r}\n"
        "if 'create' in sys.argv[1:2]:\n"
        f"    subprocess.run(XL + ['create', {str(rival)!r}], check=True)\n"
        "    while True:\n"
        f"        r = subprocess.run([{PY!r}, '-m', 'shyped.cli.shypectl', '--socket', "
        f"{str(host.socket)!r}, '--json', 'getlabel', 'dom', 'web-b1'], capture_output=True)\n"
        "        if r.returncode == 0 and json.loads(r.stdout)['state'] == 'admitted': break\n"
        "        time.sleep(0.05)\n"
        "sys.exit(subprocess.run(XL + sys.argv[1:]).returncode)\n"
    )
    a2 = host.cfg("web-a2", "bank-a-web")
    r = host.shype_xl("create", str(a2), xl=f"{PY} {racing_xl}")
    assert r.returncode == 1, r.stderr
    assert "domain web-a2 (domid" in r.stderr and "DENIED by shyped" in r.stderr
    assert "conflicts with running type 'bank-b'" in r.stderr
    assert "web-a2" not in host.xl_list()
    assert "web-b1" in host.xl_list()
    assert uuid_of("web-a2") not in json.loads(host.labels.read_text())["domains"]["uuid"]


def test_an_admission_asked_for_after_the_veto_removed_the_domain_is_answered_at_once(
    host: Host,
) -> None:
    """shype-xl asks for the admission once ``xl create`` returned; on a loaded host the
    daemon may have decided, vetoed and forgotten the domain by then. The answer is still the
    denial (the domain gone), not a wait for the whole admission timeout for a domain that
    cannot appear any more, ending in "no domain with uuid … appeared"."""
    host.start()
    assert host.xl("create", str(host.cfg("web-a1"))).returncode == 0  # Bank A runs
    assert host.xl("create", str(host.cfg("web-b1"))).returncode == 0
    wait_until(lambda: "domain gone: web-b1" in host.log(), what="the veto")
    wait_until(lambda: "web-b1" not in listing(host), what="the daemon forgot it")
    with ControlClient(host.socket) as client:
        adm = client.wait_admission(uuid_of("web-b1"), 0, 10.0)
    assert (adm.admitted, adm.state, adm.name) == (False, "gone", "web-b1")
    assert "conflicts with running type 'bank-a'" in adm.reason
    # a new domain with that UUID is waited for again, and decided afresh
    assert host.xl("destroy", str(host.domid("web-a1"))).returncode == 0
    wait_until(lambda: "web-a1" not in listing(host), what="web-a1 gone")
    r = host.shype_xl("create", str(host.cfg("web-b1")))
    assert r.returncode == 0, r.stderr
    assert listing(host)["web-b1"][0] == "admitted"


# --------------------------------------------------------------------------- policy


def v11(text: str) -> str:
    return text.replace(
        'version = "1.0"', f'version = "1.1"\nfrom = {{ name = "{POLICY}", version = "1.0" }}'
    )


def test_policy_show_check_diff_graph_and_load(host: Host) -> None:
    host.start()
    create(host, "web-a1", "bank-a-web")
    good = host.directory / "good.toml"
    good.write_text(v11(HOSTING.read_text()) + '\n[[label]]\nname = "audit"\nste = ["system"]\n')
    bad = host.directory / "bad.toml"
    bad.write_text(v11(HOSTING.read_text()).replace('"bank-a-web"', '"bank-a-frontend"'))
    broken = host.directory / "broken.toml"
    broken.write_text('[policy]\nname = "x"\n')

    shown = ok(host.ctl("policy", "show"))
    assert f'name = "{POLICY}"' in shown and 'version = "1.0"' in shown
    r = host.ctl("policy", "show", "--format", "acm-xml")  # ACM XML knows no MLS
    assert r.returncode == 2 and "cannot be written as ACM XML" in r.stderr

    assert ok(host.ctl("policy", "check", str(good))).strip() == f"{POLICY} 1.1: would be accepted"
    r = host.ctl("policy", "check", str(bad))
    assert r.returncode == 1 and "would be rejected" in r.stdout
    assert "runs with label 'bank-a-web', which the new policy deletes" in r.stdout
    r = host.ctl("policy", "check", str(broken))
    assert r.returncode == 2 and "does not load" in r.stderr

    r = host.ctl("policy", "diff", str(good))
    assert r.returncode == 1 and "+ VM label audit" in r.stdout and "+++ " in r.stdout
    assert host.ctl("policy", "diff", str(good), "--against", str(good)).returncode == 0
    graph = ok(host.ctl("policy", "graph"))
    assert graph.startswith("graph policy {") and "example.hosting 1.0" in graph

    on_disk = host.policy.read_bytes()
    r = host.ctl("policy", "load", str(bad))
    assert r.returncode == 1 and "[policy-rejected]" in r.stderr
    assert "which the new policy deletes" in r.stderr
    r = host.ctl("policy", "load", str(broken))
    assert r.returncode == 2
    assert host.policy.read_bytes() == on_disk
    assert f"policy:     {POLICY} 1.0" in ok(host.ctl("status"))

    out = ok(host.ctl("policy", "load", str(good)))
    assert out.strip() == f"loaded {POLICY} 1.1 (was {POLICY} 1.0)"
    assert f"policy:     {POLICY} 1.1" in ok(host.ctl("status"))
    assert "audit" in ok(host.ctl("labels", "--type", "vm")).split()
    assert host.policy.read_text() == good.read_text()  # where the daemon reads it at start
    assert not list(host.directory.glob(".policy.toml.load.*"))
    assert ok(host.ctl("policy", "load")).strip() == f"loaded {POLICY} 1.1 (was {POLICY} 1.1)"

    # A restarted daemon starts with the loaded policy.
    assert host.stop() == 0
    host.start()
    assert f"policy:     {POLICY} 1.1" in ok(host.ctl("status"))
    assert listing(host)["web-a1"] == ("admitted", acm("bank-a-web"))


# --------------------------------------------------------------------------- modes


def test_setenforce_permissive_over_the_socket_stops_the_vetoes(host: Host) -> None:
    host.start()
    a1 = create(host, "web-a1", "bank-a-web")
    assert ok(host.ctl("getenforce")).strip() == "Enforcing"

    # enforcing: a vif on bank B's bridge is cut and removed
    assert host.xl("network-attach", "web-a1", "bridge=xenbr-bank-b").returncode == 0
    wait_until(lambda: f"deny device vif {a1}/0" in host.log())
    assert f"-> cut vif {a1}/0" in host.log()
    wait_until(lambda: host.read(f"/libxl/{a1}/device/vif/0/backend") is None, what="vif 0 removed")

    assert ok(host.ctl("setenforce", "permissive")).strip() == "permissive (was enforcing)"
    assert ok(host.ctl("getenforce")).strip() == "Permissive"
    assert host.xl("network-attach", "web-a1", "bridge=xenbr-bank-b").returncode == 0
    denials = f"deny device vif {a1}/"
    wait_until(lambda: host.log().count(denials) == 2, what="the second vif decided")
    line = [li for li in host.log().splitlines() if denials in li][-1]
    assert line.endswith("(permissive: not enforced)")
    devid = line.split(denials, 1)[1].split()[0]
    ok(host.ctl("status"))  # answered after the decision's turn: nothing is pending for it
    backend = f"/local/domain/0/backend/vif/{a1}/{devid}"
    assert host.read(backend + "/online") == "1"
    assert host.read(backend + "/state") != "5"
    assert host.read(f"/libxl/{a1}/device/vif/{devid}/backend") == backend

    # back to enforcing: every question is asked again and the vif is cut now
    assert ok(host.ctl("setenforce", "1")).strip() == "enforcing (was permissive)"
    wait_until(lambda: host.read(f"/libxl/{a1}/device/vif/{devid}/backend") is None, what="cut")
    assert "mode permissive -> enforcing" in host.log()


# --------------------------------------------------------------------------- systemd


def test_sd_notify_ready_after_the_first_reconcile_reloading_on_sighup_and_stopping(
    host: Host,
) -> None:
    early = host.cfg("web-a1", "bank-a-web")
    host.ts.create(domain_config_from_text(early.read_text()))  # before the daemon starts
    path = host.directory / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)

    def next_message(skip_watchdog: bool = True) -> dict[str, str]:
        while True:
            data = sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in data.splitlines())
            if not (skip_watchdog and set(fields) == {"WATCHDOG"}):
                return fields

    try:
        daemon = host.start({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}, ready=False)
        first = next_message(skip_watchdog=True)
        assert first.get("READY") == "1", first
        assert first["MAINPID"] == str(daemon.proc.pid)
        # READY=1 came after the first reconcile: the domain that existed is decided.
        assert "reconcile (start)" in daemon.text()
        assert listing(host)["web-a1"] == ("admitted", acm("bank-a-web"))
        assert "2 domains (2 admitted, 0 denied)" in first["STATUS"]
        # the watchdog pings from the reactor
        assert set(next_message(skip_watchdog=False)) == {"WATCHDOG"}

        daemon.proc.send_signal(signal.SIGHUP)
        reloading = next_message()
        assert reloading.get("RELOADING") == "1", reloading
        done = next_message()
        assert done.get("READY") == "1", done
        assert "unchanged" in done["STATUS"]

        daemon.proc.send_signal(signal.SIGTERM)
        assert next_message().get("STOPPING") == "1"
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        sock.close()


# --------------------------------------------------------------------------- before ready


class MuteXenstored:
    """A Unix socket that accepts connections and never answers: the daemon connects, but its
    watches are never acknowledged, so its first reconcile never comes."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)  # read nothing, answer nothing
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_until_the_first_reconcile_there_is_no_ready_and_no_answer_but_status(
    tmp_path: Path,
) -> None:
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="shy"))
    mute = MuteXenstored(directory / "xs.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(directory / "notify.sock"))
    config = directory / "shyped.toml"
    config.write_text(
        f'[policy]\npath = "{HOSTING}"\nlabels = "{tmp_path / "labels.json"}"\n'
        f'[xenstore]\nsocket = "{directory / "xs.sock"}"\n[actuator]\nkind = "sandbox"\n'
        f'[control]\nsocket = "{directory / "control.sock"}"\n'
    )
    env = {"NOTIFY_SOCKET": str(directory / "notify.sock")}
    daemon = ShypedProcess(config, directory / "daemon.log", env)
    try:
        ctl = [PY, "-m", "shyped.cli.shypectl", "--socket", str(directory / "control.sock")]
        wait_until(lambda: (directory / "control.sock").exists() and mute.conns, what="connected")
        st = subprocess.run([*ctl, "status"], capture_output=True, text=True)
        assert st.returncode == 0 and "ready:      no" in st.stdout, st.stderr
        for args in (["list"], ["getlabel", "dom", "0"], ["setenforce", "permissive"]):
            r = subprocess.run([*ctl, *args], capture_output=True, text=True)
            assert r.returncode == 3 and "[unavailable]" in r.stderr, (args, r.stderr)
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.recv(4096)  # no READY=1 (nor anything else) so far
        daemon.proc.send_signal(signal.SIGTERM)
        notify.setblocking(True)
        notify.settimeout(30)
        assert notify.recv(4096).decode().splitlines()[0] == "STOPPING=1"
        assert daemon.proc.wait(timeout=30) == 0
        assert "Traceback" not in daemon.text() and "] ready: " not in daemon.text()
    finally:
        daemon.stop()
        notify.close()
        mute.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_before_the_first_reconcile_the_backend_answers_status_but_nothing_else(
    tmp_path: Path,
) -> None:
    config = Config(
        policy=HOSTING,
        labels=tmp_path / "labels.json",
        xenstore=XenstoreConfig(socket=tmp_path / "no-xenstored"),
        actuator=ActuatorConfig(kind="sandbox"),
        control=ControlConfig(socket=tmp_path / "control.sock"),
    )
    daemon = Daemon(config, load_policy(HOSTING), LabelStore())  # never started
    backend = DaemonControlBackend(daemon)
    st = backend.status()
    assert st.ready is False and st.policy.name == POLICY
    assert backend.labels(b.LabelsArgs("res")).labels[0].name == "bank-a-disk"
    for call in (
        backend.list_domains,
        lambda: backend.dry_run(b.DryRunArgs(domain=b.NewDomain("x"))),
        lambda: backend.setenforce(b.SetEnforceArgs("permissive")),
        lambda: backend.register_domain(b.RegisterDomainArgs(uuid_of("x"), "x", "shop")),
        lambda: backend.wait_admission(b.WaitAdmissionArgs(uuid_of("x"))),
    ):
        with pytest.raises(ControlError) as exc:
            call()
        assert exc.value.code is ErrorCode.UNAVAILABLE
    assert not (tmp_path / "labels.json").exists()
    assert re.match(r"shyped \S+ \(pid \d+\)", st.daemon)
