"""shype-xl with the sandbox toolstack (`python -m shyped.sandbox` on a real oxenstored) as its
xl, and the real control server in front of ModelBackend (the daemon's stand-in), whose
admissions look the new domain up in the sandbox and decide it with the policy engine."""

from __future__ import annotations

import subprocess
import sys
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from control_helpers import (
    Dom,
    ModelBackend,
    SandboxAdmission,
    cleanup,
    run_cli,
    serving,
    short_dir,
)
from twisted.internet import defer

from shyped.control import backend as b
from shyped.control.protocol import ControlError, ErrorCode
from shyped.sandbox.xenstored import SandboxXenstored

CFG = """\
name = "{name}"
type = "pv"
kernel = "/guest/vmlinuz"
memory = 128
seclabel = "ACM:example:{label}"
disk = [ 'format=raw,vdev=xvda,access=rw,target=/img/{name}.img' ]
vif = [ 'mac=00:16:3e:5a:11:0{n},bridge=xenbr0' ]
"""


@attrs.frozen
class Env:
    backend: ModelBackend
    admission: SandboxAdmission
    ctl: Path
    xsd: SandboxXenstored
    directory: Path

    def cfg(self, name: str, label: str, n: int = 1, extra: str = "") -> Path:
        path = self.directory / f"{name}.cfg"
        path.write_text(CFG.format(name=name, label=label, n=n) + extra)
        return path

    def xl_cmd(self) -> str:
        return f"{sys.executable} -m shyped.sandbox --socket {self.xsd.socket_path}"

    async def shype_xl(self, *args: str, socket: Path | None = None) -> Any:
        argv = [sys.executable, "-m", "shyped.cli.shypexl", "--socket", str(socket or self.ctl)]
        return await run_cli([*argv, "--xl", self.xl_cmd(), *args])

    def xl_list(self) -> dict[str, str]:
        """name -> xl's state flags, from the sandbox's `xl list`."""
        out = subprocess.run(
            [*self.xl_cmd().split(), "list"], capture_output=True, text=True, check=True
        ).stdout
        return {line.split()[0]: line.split()[4] for line in out.splitlines()[1:]}

    def label_resources(self) -> None:
        store = self.backend.store
        for name in ("web-2", "web-3"):
            store = store.with_resource(f"file:/img/{name}.img", "public-net")
        store = store.with_resource("file:/img/bank-x.img", "bank-a-disk")
        self.backend.store = store.with_resource("bridge:xenbr0", "public-net")


@pytest.fixture
def env(xenstored: SandboxXenstored) -> Iterator[Env]:
    directory = short_dir("ctlx")
    backend = ModelBackend(directory)
    admission = SandboxAdmission(backend, xenstored.socket_path)
    backend.admission = admission
    subprocess.run(
        [
            sys.executable,
            "-m",
            "shyped.sandbox",
            "--socket",
            str(xenstored.socket_path),
            "boot-host",
        ],
        check=True,
        capture_output=True,
    )
    try:
        with serving(backend, directory) as server:
            e = Env(backend, admission, server.path, xenstored, directory)
            e.label_resources()
            yield e
    finally:
        cleanup(directory)


@pytest_twisted.ensureDeferred
async def test_other_subcommands_pass_through_untouched(env: Env) -> None:
    r = await env.shype_xl("list")
    direct = subprocess.run([*env.xl_cmd().split(), "list"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, direct.stdout)
    # even without a daemon: only create and attaches are checked
    r = await env.shype_xl("list", "Domain-0", socket=env.directory / "none.sock")
    assert r.returncode == 0 and "Domain-0" in r.stdout
    r = await env.shype_xl("destroy", "no-such-domain")
    assert r.returncode == 1 and "no-such-domain" in r.stderr  # xl's own failure and status


@pytest_twisted.ensureDeferred
async def test_create_admitted_then_unpaused(env: Env) -> None:
    cfg = env.cfg("web-2", "web")
    r = await env.shype_xl("create", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "admitted (ACM:example:web)" in r.stderr
    assert env.xl_list()["web-2"] == "-b----"  # running, not paused
    # the cfg had no uuid: shype-xl made one, registered it and gave it to xl
    dom = next(d for d in env.backend.domains.values() if d.name == "web-2")
    assert dom.uuid is not None and uuidlib.UUID(dom.uuid)
    assert env.backend.reload_store().domain_label(dom.uuid, None) == "web"
    assert (dom.state, dom.label) == ("admitted", "web")


@pytest_twisted.ensureDeferred
async def test_create_as_xendomains_calls_it(env: Env) -> None:
    # Debian's xendomains: `xen create --quiet --defconfig FILE`
    r = await env.shype_xl("create", "--quiet", "--defconfig", str(env.cfg("web-2", "web")))
    assert r.returncode == 0, r.stderr
    assert env.xl_list()["web-2"] == "-b----"


@pytest_twisted.ensureDeferred
async def test_create_paused_stays_paused(env: Env) -> None:
    uuid = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0042"
    r = await env.shype_xl("create", "-p", str(env.cfg("web-3", "web", 3)), f'uuid="{uuid}"')
    assert r.returncode == 0, r.stderr
    assert env.xl_list()["web-3"] == "--p---"
    assert env.backend.reload_store().domain_label(uuid, None) == "web"


@pytest_twisted.ensureDeferred
async def test_dry_run_denial_creates_nothing(env: Env) -> None:
    # bank-a-1 runs (in the daemon's view): bank-b is walled off
    r = await env.shype_xl("create", str(env.cfg("bank-x", "bank-b")))
    assert r.returncode == 1
    assert "DENIED by shyped (nothing created)" in r.stderr and "chinese-wall" in r.stderr
    assert "bank-x" not in env.xl_list()
    assert env.backend.reload_store().by_uuid == {}


@pytest_twisted.ensureDeferred
async def test_admission_denial_destroys_the_paused_domain(env: Env) -> None:
    admission = env.admission

    def racing(args: b.WaitAdmissionArgs) -> Any:
        # another bank-b domain got admitted between the dry run and the admission
        env.backend.add_domain(Dom(50, "racer", None, "bank-b"))
        return admission(args)

    env.backend.admission = racing
    env.backend.domains.pop(1)  # no bank-a domain now: the dry run permits bank-a
    r = await env.shype_xl("create", str(env.cfg("bank-x", "bank-a")), "vif=[]")
    assert r.returncode == 1, r.stderr
    assert "domain bank-x (domid 1) DENIED by shyped" in r.stderr  # created, then denied
    assert "chinese-wall" in r.stderr and "bank-b" in r.stderr
    assert "bank-x" not in env.xl_list()  # destroyed, never unpaused
    assert env.backend.reload_store().by_uuid == {}  # its registration is forgotten


@pytest_twisted.ensureDeferred
async def test_unreachable_daemon_fails_closed(env: Env) -> None:
    nowhere = env.directory / "none.sock"
    r = await env.shype_xl("create", str(env.cfg("web-2", "web")), socket=nowhere)
    assert r.returncode == 3
    assert "cannot connect to shyped" in r.stderr and "fail closed" in r.stderr
    assert "web-2" not in env.xl_list()
    r = await env.shype_xl("block-attach", "Domain-0", "/img/x.img,raw,xvdb,rw", socket=nowhere)
    assert r.returncode == 3


@pytest_twisted.ensureDeferred
async def test_fail_open_goes_on_with_a_warning(env: Env) -> None:
    nowhere = env.directory / "none.sock"
    r = await env.shype_xl("--fail-open", "create", str(env.cfg("web-2", "web")), socket=nowhere)
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "--fail-open" in r.stderr
    assert env.xl_list()["web-2"] == "-b----"


@pytest_twisted.ensureDeferred
async def test_attach_is_checked_first(env: Env) -> None:
    assert (await env.shype_xl("create", str(env.cfg("web-2", "web")))).returncode == 0
    # an unlabelled image: denied, nothing attached
    r = await env.shype_xl("block-attach", "web-2", "format=raw,vdev=xvdb,target=/img/other.img")
    assert r.returncode == 1 and "DENIED" in r.stderr and "unlabelled resources" in r.stderr
    paths = subprocess.run(
        ["xenstore-ls", "-f", "/libxl"], env=env.xsd.env(), capture_output=True, text=True
    ).stdout
    assert "/device/vbd/51728" not in paths
    # a labelled one goes through to xl
    r = await env.shype_xl("block-attach", "web-2", "format=raw,vdev=xvdb,target=/img/web-3.img")
    assert r.returncode == 0, r.stderr
    paths = subprocess.run(
        ["xenstore-ls", "-f", "/libxl"], env=env.xsd.env(), capture_output=True, text=True
    ).stdout
    assert "/device/vbd/51728" in paths
    # several arguments are scanned one by one, as xl does (a target= ends with its argument)
    r = await env.shype_xl(
        "block-attach", "web-2", "format=raw,vdev=xvdc,target=/img/web-3.img", "access=r"
    )
    assert r.returncode == 0, r.stderr
    r = await env.shype_xl("network-attach", "web-2", "bridge=secret-br")
    assert r.returncode == 1 and "DENIED" in r.stderr


@pytest_twisted.ensureDeferred
async def test_usage_errors(env: Env) -> None:
    cfg = env.cfg("web-2", "web")
    r = await env.shype_xl("create", "-F", str(cfg))
    assert r.returncode == 2 and "cannot be wrapped" in r.stderr
    r = await env.shype_xl("create")
    assert r.returncode == 2 and "no config file" in r.stderr
    bad = env.directory / "bad.cfg"
    bad.write_text(
        'name = "x"\nseclabel = "ACM:example:web"\n'
        'access_control = ["policy=example,label=bank-a"]\n'
    )
    r = await env.shype_xl("create", str(bad))
    assert r.returncode == 2 and "different labels" in r.stderr
    r = await env.shype_xl("--bogus", "list")
    assert r.returncode == 2
    assert env.xl_list().keys() == {"Domain-0"}


def _logging_xl(env: Env) -> tuple[str, Path]:
    """An xl that logs each argv (one line) and runs the sandbox's."""
    log = env.directory / "xl.log"
    script = env.directory / "xl-logging"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec {env.xl_cmd()} "$@"\n')
    script.chmod(0o755)
    return str(script), log


def _domids(env: Env) -> dict[str, str]:
    out = subprocess.run(
        [*env.xl_cmd().split(), "list"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}


@pytest_twisted.ensureDeferred
async def test_fail_open_unpauses_by_domid_never_by_name(env: Env) -> None:
    """Issue 20 #3: shype-xl acted by name (``xl unpause NAME`` on fail-open); a name may be
    another domain's by then. It must act on the domid of the UUID it created."""
    xl, log = _logging_xl(env)
    nowhere = env.directory / "none.sock"
    argv = [sys.executable, "-m", "shyped.cli.shypexl", "--socket", str(nowhere), "--xl", xl]
    r = await run_cli([*argv, "--fail-open", "create", str(env.cfg("web-2", "web"))])
    assert r.returncode == 0, r.stderr
    domid = _domids(env)["web-2"]
    calls = log.read_text().splitlines()
    assert f"unpause {domid}" in calls, calls
    assert not [c for c in calls if c.split()[:1] in (["unpause"], ["destroy"]) and "web-2" in c]


@pytest_twisted.ensureDeferred
async def test_no_admission_destroys_by_domid(env: Env) -> None:
    """The fail-closed destroy after a failed admission wait names the domid, not the name."""
    xl, log = _logging_xl(env)

    def no_answer(args: b.WaitAdmissionArgs) -> Any:
        return defer.fail(ControlError(ErrorCode.ADMISSION_TIMEOUT, "no admission in time"))

    env.backend.admission = no_answer
    argv = [sys.executable, "-m", "shyped.cli.shypexl", "--socket", str(env.ctl), "--xl", xl]
    r = await run_cli([*argv, "--admission-timeout", "1", "create", str(env.cfg("web-2", "web"))])
    assert r.returncode != 0
    calls = log.read_text().splitlines()
    destroys = [c for c in calls if c.startswith("destroy")]
    assert destroys and all(c.split()[1].isdecimal() for c in destroys), calls
    assert "web-2" not in env.xl_list()


@pytest_twisted.ensureDeferred
async def test_a_cfg_xl_would_read_otherwise_is_refused(env: Env) -> None:
    """``name="shop-\\061"`` is ``shop-`` for libxl and was ``shop-1`` for shyped: with a paused
    ``shop-1`` beside it, a fail-open create unpaused that other domain. Now refused up front."""
    other = env.directory / "shop-1.cfg"
    other.write_text('name = "shop-1"\ntype = "pv"\nkernel = "/k"\nmemory = 64\n')
    subprocess.run([*env.xl_cmd().split(), "create", "-p", str(other)], check=True)
    cfg = env.directory / "esc.cfg"
    cfg.write_text('name = "shop-\\061"\ntype = "pv"\nkernel = "/k"\nmemory = 64\n')
    nowhere = env.directory / "none.sock"
    r = await env.shype_xl("--fail-open", "create", str(cfg), socket=nowhere)
    assert r.returncode == 2 and "backslash" in r.stderr, r.stderr
    assert env.xl_list()["shop-1"] == "--p---"


@pytest_twisted.ensureDeferred
async def test_dry_run_sees_a_slashed_path_as_the_labelled_disk(env: Env) -> None:
    """Issue 11 #11 through shype-xl's dry run: ``//img/bank-x.img`` is bank-a's disk, not an
    unlabelled one."""
    assert (await env.shype_xl("create", str(env.cfg("web-2", "web")))).returncode == 0
    r = await env.shype_xl("block-attach", "web-2", "format=raw,vdev=xvdb,target=//img/bank-x.img")
    assert r.returncode == 1 and "DENIED" in r.stderr, r.stderr
    assert "bank-a" in r.stderr and "unlabelled" not in r.stderr


@pytest_twisted.ensureDeferred
async def test_cfg_keys_that_hand_over_host_resources_are_refused(env: Env) -> None:
    """Red team (third round): device_model_args, a host serial port, usbdevice … give the
    guest host resources without any xenstore device record the daemon could decide; the
    preview read them not at all. shype-xl refuses such a cfg before anything is created."""
    cfg = env.cfg("web-2", "web")
    base = cfg.read_text()
    for extra in (
        'device_model_args_hvm = [ "-drive", "file=/srv/xen/images/web-b1.img,if=ide" ]\n',
        'serial = "file:/srv/xen/images/web-b1.img"\n',
        'usbdevice = "host:1234:5678"\n',
    ):
        cfg.write_text(base + extra)
        r = await env.shype_xl("create", str(cfg))
        assert r.returncode == 2 and "host resources" in r.stderr, (extra, r.stderr)
    assert "web-2" not in env.xl_list()
    cfg.write_text(base + 'serial = "pty"\n')
    assert (await env.shype_xl("create", str(cfg))).returncode == 0
