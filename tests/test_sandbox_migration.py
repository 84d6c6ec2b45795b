"""The sandbox toolstack's save, restore and live migration, as xl / libxl 4.17 write them
(shyped.sandbox.migration), between two real sandbox oxenstoreds."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import domcfg

from shyped.sandbox import migration
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
from shyped.sandbox.xsconn import XsConn


@pytest.fixture
def second() -> Iterator[SandboxXenstored]:
    xsd = SandboxXenstored(short_instance_dir())
    xsd.start()
    try:
        yield xsd
    finally:
        xsd.stop()


def _toolstacks(a: SandboxXenstored, b: SandboxXenstored) -> tuple[Toolstack, Toolstack]:
    ts_a, ts_b = Toolstack(a.socket_path), Toolstack(b.socket_path)
    ts_a.boot_host()
    ts_b.boot_host()
    return ts_a, ts_b


def _read(xsd: SandboxXenstored, path: str) -> str | None:
    with XsConn(str(xsd.socket_path)) as xs:
        return xs.read(path)


def _names(ts: Toolstack) -> dict[str, bool]:
    return {d.name: d.paused for d in ts.list_domains() if d.domid}


def test_migrate_creates_paused_incoming_renames_and_unpauses_then_destroys_the_source(
    xenstored: SandboxXenstored, second: SandboxXenstored
) -> None:
    ts_a, ts_b = _toolstacks(xenstored, second)
    cfg = domcfg("web-a1", disks=["format=raw,vdev=xvda,target=/srv/xen/images/web-a1.img"])
    src = ts_a.create(cfg, paused=False)
    seen: dict[str, object] = {}

    def ready(new: int) -> None:
        seen["name"] = _read(second, f"/local/domain/{new}/name")
        seen["vm_name"] = _read(second, f"/vm/{cfg.uuid}/name")
        seen["paused"] = _names(ts_b)
        seen["source"] = _read(xenstored, f"/local/domain/{src}/control/shutdown")

    new = migration.migrate(ts_a, "web-a1", ts_b, ready=ready)
    assert seen == {
        "name": "web-a1--incoming",
        "vm_name": "web-a1--incoming",
        "paused": {"web-a1--incoming": True},
        "source": "",  # the guest acknowledged libxl's suspend request
    }
    assert _names(ts_b) == {"web-a1": False} and _names(ts_a) == {}
    assert _read(second, f"/local/domain/{new}/name") == "web-a1"
    assert _read(second, f"/vm/{cfg.uuid}/name") == "web-a1"
    assert _read(second, f"/local/domain/{new}/device/vbd/51712/backend") is not None
    assert _read(xenstored, f"/vm/{cfg.uuid}/name") is None


def test_a_failed_receive_resumes_the_source_under_its_name(
    xenstored: SandboxXenstored, second: SandboxXenstored
) -> None:
    ts_a, ts_b = _toolstacks(xenstored, second)
    ts_a.create(domcfg("web-a1"), paused=False)

    def vetoed(new: int) -> None:  # the destination's daemon destroys the incoming domain
        ts_b.destroy(new)

    with pytest.raises(migration.MigrationError, match="gone at the target"):
        migration.migrate(ts_a, "web-a1", ts_b, ready=vetoed)
    assert _names(ts_a) == {"web-a1": False} and _names(ts_b) == {}


def test_save_and_restore_through_the_cli(
    xenstored: SandboxXenstored, second: SandboxXenstored, tmp_path: Path
) -> None:
    ts_a, ts_b = _toolstacks(xenstored, second)
    cfg = domcfg("shop-1", vifs=["bridge=xenbr-public"])
    ts_a.create(cfg, paused=False)
    save = tmp_path / "shop-1.save"

    def xl(xsd: SandboxXenstored, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "shyped.sandbox", "--socket", str(xsd.socket_path), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    assert xl(xenstored, "save", "shop-1", str(save)).returncode == 0
    assert _names(ts_a) == {} and save.read_bytes().startswith(b"Xen saved domain, xl format\n")
    r = xl(second, "restore", "-p", str(save))
    assert r.returncode == 0, r.stderr
    assert _names(ts_b) == {"shop-1": True}
    (dom,) = [d for d in ts_b.list_domains() if d.domid]
    assert _read(second, f"/local/domain/{dom.domid}/vm") == f"/vm/{cfg.uuid}"
    assert _read(second, f"/local/domain/{dom.domid}/device/vif/0/backend") is not None
    assert xl(second, "migrate", "shop-1", str(xenstored.socket_path)).returncode == 0
    assert _names(ts_a) == {"shop-1": False} and _names(ts_b) == {}
