"""The runner's own guarantees: results framed by the real e2e-lib.sh survive Xen's lines
between them and a damaged one is an error, a hung boot fails with the serial log's tail, and a
failing scenario comes back with its exit code and dom0's diagnostics."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from builder import Images
from flaskboot import flask_hypervisor
from flaskxen import FlaskXen
from runner import (
    DOM0_CMDLINE,
    XEN_CMDLINE,
    E2EError,
    Hypervisor,
    SerialFollower,
    Timeouts,
    qemu_command,
    run_scenario,
)

LIB = Path(__file__).parent / "image" / "e2e-lib.sh"

pytestmark = pytest.mark.e2e


def framed(tmp_path: Path, name: str, data: bytes) -> list[str]:
    """What dom0 prints for `e2e_put name`: the real lib under busybox sh."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox (busybox-static) is required"
    src = tmp_path / "payload"
    src.write_bytes(data)
    out = subprocess.run(
        [busybox, "sh", "-c", f'. "{LIB}"; e2e_put "$0" "$1"', name, str(src)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


def follow(tmp_path: Path, lines: list[str]) -> SerialFollower:
    serial = tmp_path / "serial.log"
    # Xen's serial console ends lines with CRLF.
    serial.write_bytes("".join(f"{line}\r\n" for line in lines).encode())
    follower = SerialFollower(serial, time.monotonic())
    follower.poll()
    return follower


def test_results_survive_xen_lines_between_them(tmp_path: Path) -> None:
    data = bytes(random.Random(7).randrange(256) for _ in range(5000))
    lines = framed(tmp_path, "blob.bin", data)
    assert len(lines) > 50
    lines.insert(20, "(XEN) d1v0: upcall vector f3")
    lines.insert(40, "[   12.345678] some kernel line")
    follower = follow(tmp_path, ["@@E2E STEP working", *lines, "@@E2E EXIT 3"])
    assert follower.files == {"blob.bin": data}
    assert follower.exit_code == 3
    assert [s for _, s in follower.steps] == ["working"]


@pytest.mark.parametrize("damage", ["drop", "splice"])
def test_a_damaged_result_is_an_error(tmp_path: Path, damage: str) -> None:
    lines = framed(tmp_path, "blob.bin", os.urandom(3000))
    if damage == "drop":
        del lines[10]
    else:  # Xen's output landing inside one of ours
        lines[10] = lines[10][:30] + "(XEN) hello" + lines[10][30:]
    with pytest.raises(E2EError, match=r"result blob.bin arrived damaged"):
        follow(tmp_path, lines)


def test_panic_lines_are_noticed(tmp_path: Path) -> None:
    follower = follow(tmp_path, ["(XEN) ****************", "(XEN) Panic on CPU 0:"])
    assert follower.panic == "(XEN) Panic on CPU 0:"


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_a_hypervisor_replaces_xen_and_adds_its_cmdline_and_modules(tmp_path: Path) -> None:
    images = Images(tmp_path / "images", {})
    initrd, policy = tmp_path / "dom0.cpio.gz", tmp_path / "xenpolicy"
    debian = qemu_command(images, initrd, tmp_path / "serial", host_share=False)
    assert _arg(debian, "-kernel") == str(images.xen)
    assert _arg(debian, "-append") == XEN_CMDLINE
    assert _arg(debian, "-initrd") == f"{images.kernel} {DOM0_CMDLINE},{initrd}"

    flask = FlaskXen(tmp_path / "flask-xen", {})
    hv = flask_hypervisor(flask, mode="enforcing", policy_binary=policy)
    cmd = qemu_command(images, initrd, tmp_path / "serial", host_share=False, hypervisor=hv)
    assert _arg(cmd, "-kernel") == str(flask.xen)
    assert _arg(cmd, "-append") == f"{XEN_CMDLINE} flask=enforcing"
    # The policy is one more multiboot module, after dom0's kernel and initramfs.
    assert _arg(cmd, "-initrd").split(",") == [
        f"{images.kernel} {DOM0_CMDLINE}",
        str(initrd),
        str(policy),
    ]
    with pytest.raises(E2EError, match="cannot take a path with"):
        bad = Hypervisor(xen=flask.xen, modules=(tmp_path / "a,b",))
        qemu_command(images, initrd, tmp_path / "serial", host_share=False, hypervisor=bad)


def test_enforcing_flask_without_a_policy_is_refused_up_front(tmp_path: Path) -> None:
    """Xen would panic at boot ("Unable to load FLASK policy")."""
    with pytest.raises(ValueError, match="panics Xen"):
        flask_hypervisor(FlaskXen(tmp_path, {}), mode="enforcing", policy_binary=None)
    assert flask_hypervisor(FlaskXen(tmp_path, {}), mode="permissive").modules == ()


def test_a_hung_boot_fails_with_the_serial_tail(e2e_images: Images, tmp_path: Path) -> None:
    script = tmp_path / "never.sh"
    script.write_text("e2e_fail 'never reached'\n")
    started = time.monotonic()
    with pytest.raises(E2EError) as info:
        run_scenario(e2e_images, script, workdir=tmp_path / "run", timeouts=Timeouts(boot=8))
    message = str(info.value)
    assert "timeout after 8s: dom0's /init never ran" in message
    assert "serial log tail" in message
    # The tail is taken from the serial log (Xen's or dom0's lines, depending on how far the
    # boot got in 8 s on this machine).
    serial = (tmp_path / "run" / "serial.log").read_text(errors="replace")
    tail = [ln.strip() for ln in message.split("--- serial log tail", 1)[1].splitlines()[1:]]
    tail = [ln for ln in tail if ln]
    assert tail and all(ln in serial for ln in tail)
    assert time.monotonic() - started < 60
    # QEMU is gone: nothing keeps the serial log growing.
    size = (tmp_path / "run" / "serial.log").stat().st_size
    time.sleep(1)
    assert (tmp_path / "run" / "serial.log").stat().st_size == size


def test_a_failing_scenario_returns_its_code_and_dom0_diagnostics(
    e2e_images: Images, tmp_path: Path
) -> None:
    script = tmp_path / "fails.sh"
    script.write_text(
        'echo "partial result" | e2e_put partial.txt\n'
        'e2e_wait_for 1 "something that never happens" false || e2e_fail "gave up"\n'
        "echo unreachable | e2e_put unreachable.txt\n"
    )
    result = run_scenario(e2e_images, script, workdir=tmp_path / "run", host_share=False)
    assert result.exit_code == 1
    assert result.text("partial.txt") == "partial result\n"
    assert "unreachable.txt" not in result.files
    steps = [s for _, s in result.steps]
    assert "timeout after 1s waiting for: something that never happens" in steps
    assert "FAILED: gave up" in steps
    assert "Domain-0" in result.text("diag/xenstore-ls.txt")
    assert "Linux version" in result.text("diag/dmesg.txt")
    assert (tmp_path / "run" / "results" / "diag" / "dmesg.txt").exists()
