"""shypectl as an operator runs it (a subprocess) against the real control server, with
ModelBackend standing in for the daemon: output and exit status of every command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from control_helpers import (
    POLICY_TOML_11,
    POLICY_TOML_BAD,
    ModelBackend,
    aserving,
    run_cli,
    serving,
    web_backend,
)

from shyped.control.backend import Access, Peer
from shyped.control.server import Authorizer

CFG = """\
# a guest
name = "web-2"
type = "pv"
kernel = "/guest/vmlinuz"
memory = 128
disk = [ 'format=raw,vdev=xvda,access=rw,target=/img/web.img' ]
vif = [ 'mac=00:16:3e:5a:11:01,bridge=xenbr0' ]
"""


@pytest.fixture
def backend() -> Iterator[ModelBackend]:
    with web_backend("ctlc") as be:
        yield be


@pytest.fixture
def sock(backend: ModelBackend) -> Iterator[Path]:
    with serving(backend, backend.directory) as server:
        yield server.path


async def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await run_cli(
        [sys.executable, "-m", "shyped.cli.shypectl", "--socket", str(sock), *args]
    )


async def ctl_json(sock: Path, *args: str) -> tuple[int, object]:
    r = await ctl(sock, "--json", *args)
    return r.returncode, json.loads(r.stdout)


@pytest_twisted.ensureDeferred
async def test_status(sock: Path) -> None:
    r = await ctl(sock, "status")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    assert lines["mode"].strip() == "enforcing"
    assert lines["policy"].strip() == "example 1.0 (toml)"
    assert len(lines["sha256"].strip()) == 64
    assert lines["domains"].strip().startswith("3 (3 admitted, 0 denied")
    code, doc = await ctl_json(sock, "status")
    assert code == 0 and doc["policy"]["name"] == "example" and doc["counts"]["domains"] == 3  # type: ignore[index]


@pytest_twisted.ensureDeferred
async def test_getenforce_and_setenforce(backend: ModelBackend, sock: Path) -> None:
    assert (await ctl(sock, "getenforce")).stdout == "Enforcing\n"
    r = await ctl(sock, "setenforce", "0")
    assert (r.returncode, r.stdout) == (0, "permissive (was enforcing)\n")
    assert (await ctl(sock, "getenforce")).stdout == "Permissive\n"
    r = await ctl(sock, "setenforce", "sometimes")
    assert r.returncode == 2 and "enforcing|permissive" in r.stderr
    assert backend.mode == "permissive"


@pytest_twisted.ensureDeferred
async def test_labels(sock: Path) -> None:
    assert (await ctl(sock, "labels")).stdout.split() == ["dom0", "bank-a", "bank-b", "web"]
    r = await ctl(sock, "labels", "--type", "res")
    assert r.stdout.split() == ["bank-a-disk", "bank-b-disk", "public-net"]
    r = await ctl(sock, "labels", "--type", "any", "-l")
    assert "vm  bank-a  ste=bank-a cw=bank-a" in r.stdout
    assert "res public-net  ste=web" in r.stdout
    code, doc = await ctl_json(sock, "labels", "--type", "vm")
    assert code == 0 and doc["labels"][0]["bootstrap"] is True  # type: ignore[index]


@pytest_twisted.ensureDeferred
async def test_getlabel(sock: Path) -> None:
    for ref in ("bank-a-1", "1", "11111111-1111-4111-8111-111111111111"):
        r = await ctl(sock, "getlabel", "dom", ref)
        assert (r.returncode, r.stdout) == (0, "ACM:example:bank-a\n")
    r = await ctl(sock, "getlabel", "dom", "ghost")
    assert r.returncode == 5 and "no domain 'ghost'" in r.stderr and "[not-found]" in r.stderr
    r = await ctl(sock, "getlabel", "res", "file:/img/none.img")
    assert (r.returncode, r.stdout) == (0, "(unlabelled)\n")
    r = await ctl(sock, "getlabel", "res", "relative/path.img")
    assert r.returncode == 2 and "invalid resource" in r.stderr


@pytest_twisted.ensureDeferred
async def test_addlabel_and_rmlabel_on_a_config_file(sock: Path, backend: ModelBackend) -> None:
    cfg = backend.directory / "web-2.cfg"
    cfg.write_text(CFG + 'access_control = [ "policy=example,label=bank-a" ]\n')
    cfg.chmod(0o640)
    r = await ctl(sock, "addlabel", "web", "dom", str(cfg))
    assert r.returncode == 0, r.stderr
    text = cfg.read_text()
    assert text == CFG + 'seclabel = "ACM:example:web"\n'
    assert cfg.stat().st_mode & 0o777 == 0o640
    # an unknown label or one of another policy leaves the file alone
    r = await ctl(sock, "addlabel", "nope", "dom", str(cfg))
    assert r.returncode == 6 and "unknown label 'nope'" in r.stderr
    r = await ctl(sock, "addlabel", "bnak-a", "dom", str(cfg))  # a typo
    assert r.returncode == 6, r.stderr
    assert "unknown label 'bnak-a', did you mean 'bank-a'?" in r.stderr
    code, doc = await ctl_json(sock, "addlabel", "bnak-a", "dom", str(cfg))
    err = doc["error"]  # type: ignore[index]
    assert (
        code == 6
        and err["code"] == "unknown-label"
        and err["details"]["suggestions"][0] == "bank-a"
    )
    r = await ctl(sock, "addlabel", "ACM:other:web", "dom", str(cfg))
    assert r.returncode == 2 and "not the active 'example'" in r.stderr
    assert cfg.read_text() == text
    # a cfg xl could not parse is refused, not mangled
    broken = backend.directory / "broken.cfg"
    broken.write_text('name = "x"\nimport os\n')
    r = await ctl(sock, "addlabel", "web", "dom", str(broken))
    assert r.returncode == 2 and "expected '=' after import" in r.stderr
    assert broken.read_text() == 'name = "x"\nimport os\n'
    r = await ctl(sock, "rmlabel", "dom", str(cfg))
    assert r.returncode == 0 and cfg.read_text() == CFG
    r = await ctl(sock, "addlabel", "web", "dom", str(backend.directory / "missing.cfg"))
    assert r.returncode == 2 and "cannot read domain config" in r.stderr
    # a symlink is not edited (its target's mode and owner would be copied onto the new file)
    link = backend.directory / "link.cfg"
    link.symlink_to(cfg)
    r = await ctl(sock, "addlabel", "web", "dom", str(link))
    assert r.returncode == 2 and "not a regular file" in r.stderr
    assert link.is_symlink() and cfg.read_text() == CFG


@pytest_twisted.ensureDeferred
async def test_addlabel_on_a_running_domain(sock: Path, backend: ModelBackend) -> None:
    r = await ctl(sock, "addlabel", "bank-b", "mgt", "web-1")
    assert r.returncode == 1
    assert "denied" in r.stderr and "chinese-wall" in r.stderr and "bank-a" in r.stderr
    assert backend.domains[2].label == "web"
    r = await ctl(sock, "addlabel", "bank-a", "mgt", "2")
    assert (r.returncode, r.stdout) == (0, "web-1 (domid 2): ACM:example:bank-a\n")
    assert backend.domains[2].label == "bank-a"


@pytest_twisted.ensureDeferred
async def test_resource_labels(sock: Path, backend: ModelBackend) -> None:
    r = await ctl(sock, "addlabel", "bank-a-disk", "res", "file:/img/a.img")
    assert (r.returncode, r.stdout) == (
        0,
        "disk:/img/a.img: ACM:example:bank-a-disk (was unlabelled)\n",
    )
    r = await ctl(sock, "addlabel", "public-net", "res", "bridge:xenbr0")
    assert r.returncode == 0
    r = await ctl(sock, "resources")
    assert r.stdout.splitlines() == [
        "bridge:xenbr0    ACM:example:public-net",
        "disk:/img/a.img  ACM:example:bank-a-disk",
    ]
    assert backend.reload_store().resource_label("bridge:xenbr0") == "public-net"
    r = await ctl(sock, "addlabel", "web", "res", "bridge:xenbr0")
    assert r.returncode == 6 and "no resource label 'web'; 'web' is a VM label" in r.stderr
    r = await ctl(sock, "rmlabel", "res", "file:/img/a.img")
    assert r.returncode == 0 and "was ACM:example:bank-a-disk" in r.stdout
    assert (await ctl(sock, "getlabel", "res", "/img/a.img")).stdout == "(unlabelled)\n"


@pytest_twisted.ensureDeferred
async def test_dry_run(sock: Path, backend: ModelBackend) -> None:
    cfg = backend.directory / "web-2.cfg"
    cfg.write_text(CFG + 'seclabel = "ACM:example:web"\n')
    await ctl(sock, "addlabel", "public-net", "res", "bridge:xenbr0")
    # the disk is unlabelled and the policy denies unlabelled resources
    r = await ctl(sock, "dry-run", str(cfg))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["domain", "web-2", "PERMITTED"]
    assert lines[1].split()[:3] == ["disk", "xvda", "(/img/web.img)"] and "DENIED" in lines[1]
    assert "unlabelled resources are denied" in lines[1]
    assert lines[2].split()[:5] == ["vif", "0", "(bridge", "xenbr0)", "PERMITTED"]
    assert lines[-1] == "DENIED"
    # a KEY=VALUE override is read as xl reads it; a labelled disk makes it all PERMITTED
    await ctl(sock, "addlabel", "public-net", "res", "file:/img/ok.img")
    r = await ctl(
        sock, "dry-run", str(cfg), "disk=['format=raw,vdev=xvdb,access=r,target=/img/ok.img']"
    )
    assert r.returncode == 0, r.stdout
    assert r.stdout.splitlines()[-1] == "PERMITTED"
    code, doc = await ctl_json(sock, "dry-run", str(cfg), 'seclabel="ACM:example:bank-b"')
    assert code == 1
    items = doc["items"]  # type: ignore[index]
    assert items[0]["kind"] == "domain" and not items[0]["permitted"]
    assert "chinese-wall" in items[0]["reason"]
    r = await ctl(sock, "dry-run", str(cfg), "disk=['nonsense']")
    assert r.returncode == 2 and "disk spec" in r.stderr


@pytest_twisted.ensureDeferred
async def test_list(sock: Path) -> None:
    r = await ctl(sock, "list")
    rows = [line.split() for line in r.stdout.splitlines()]
    # xl list -Z's columns; the stand-in backend knows no memory, vCPUs or CPU time
    assert rows[0] == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Security", "Label"]
    assert rows[1:] == [
        ["Domain-0", "0", "-", "-", "admitted", "-", "ACM:example:dom0"],
        ["bank-a-1", "1", "-", "-", "admitted", "-", "ACM:example:bank-a"],
        ["web-1", "2", "-", "-", "admitted", "-", "ACM:example:web"],
    ]
    # a domain filter, as xl list DOMAIN: by name, domid or uuid
    r = await ctl(sock, "list", "web-1", "1")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["bank-a-1", "web-1"]
    r = await ctl(sock, "list", "ghost")
    assert r.returncode == 5 and "no domain 'ghost'" in r.stderr and r.stdout == ""
    r = await ctl(sock, "list", "web-1", "--json")  # --json after the sub-command
    assert r.returncode == 0 and [d["name"] for d in json.loads(r.stdout)["domains"]] == ["web-1"]


@pytest_twisted.ensureDeferred
async def test_policy_commands(sock: Path, backend: ModelBackend) -> None:
    good = backend.directory / "p11.toml"
    good.write_text(POLICY_TOML_11)
    bad = backend.directory / "bad.toml"
    bad.write_text(POLICY_TOML_BAD)
    invalid = backend.directory / "invalid.toml"
    invalid.write_text('[policy]\nname = "x"\n')

    shown = await ctl(sock, "policy", "show")
    assert shown.returncode == 0 and 'name = "example"' in shown.stdout
    xml = await ctl(sock, "policy", "show", "--format", "acm-xml")
    assert "<SecurityPolicyDefinition" in xml.stdout

    r = await ctl(sock, "policy", "check", str(good))
    assert (r.returncode, r.stdout) == (0, "example 1.1: would be accepted\n")
    r = await ctl(sock, "policy", "check", str(bad))
    assert r.returncode == 1 and "would be rejected" in r.stdout and "bank-a" in r.stdout
    r = await ctl(sock, "policy", "check", str(invalid))
    assert r.returncode == 2 and "invalid.toml" in r.stderr and "[policy-invalid]" in r.stderr

    r = await ctl(sock, "policy", "diff", str(good))
    assert r.returncode == 1
    assert "+ VM label audit" in r.stdout and '+name = "audit"' in r.stdout
    r = await ctl(sock, "policy", "diff", str(good), "--against", str(good))
    assert (r.returncode, r.stdout) == (0, "")

    r = await ctl(sock, "policy", "load", str(bad))
    assert r.returncode == 1 and "[policy-rejected]" in r.stderr
    r = await ctl(sock, "policy", "load", str(good))
    assert (r.returncode, r.stdout) == (0, "loaded example 1.1 (was example 1.0)\n")
    assert backend.policy.version.minor == 1
    assert (await ctl(sock, "labels")).stdout.split()[-1] == "audit"


@pytest_twisted.ensureDeferred
async def test_policy_graph(sock: Path, backend: ModelBackend) -> None:
    r = await ctl(sock, "policy", "graph")
    assert r.returncode == 0 and r.stdout.lstrip().startswith(("graph", "digraph"))
    assert '"bank-a"' in r.stdout
    if shutil.which("dot") is None:
        pytest.skip("Graphviz dot is not installed")
    out = backend.directory / "policy.svg"
    r = await ctl(sock, "policy", "graph", str(backend.policy_path), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "<svg" in out.read_text()


@pytest_twisted.ensureDeferred
async def test_unreachable_daemon(backend: ModelBackend) -> None:
    r = await ctl(backend.directory / "nothing.sock", "status")
    assert r.returncode == 3 and "cannot connect to shyped" in r.stderr
    r = await ctl(backend.directory / "nothing.sock", "--json", "status")
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["code"] == "unreachable"


class ReadOnly(Authorizer):
    def access(self, peer: Peer) -> Access | None:
        return "read"


@pytest_twisted.ensureDeferred
async def test_permission_denied_exit_status(backend: ModelBackend) -> None:
    async with aserving(backend, backend.directory, authorizer=ReadOnly()) as server:
        r = await ctl(server.path, "setenforce", "permissive")
        ok = await ctl(server.path, "getenforce")
        j = await ctl(server.path, "--json", "setenforce", "permissive")
    assert r.returncode == 4 and "[permission-denied]" in r.stderr
    assert ok.returncode == 0
    assert j.returncode == 4 and json.loads(j.stdout)["error"]["code"] == "permission-denied"


@pytest_twisted.ensureDeferred
async def test_usage_and_audit_mount(sock: Path) -> None:
    r = await ctl(sock, "frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = await ctl(sock, "audit", "--help")
    assert r.returncode == 0 and "verify" in r.stdout and "tail" in r.stdout
