"""Issue 11 #13: the files shyped trusts are read bounded, and `check` validates what start does.

Played as an operator's typo or a hostile path: ``labels = "/dev/zero"`` or a policy path of
``/dev/zero`` once made ``shyped check`` read until it had eaten ~5 GB. The check processes run
under an address-space limit so that the old behaviour ends in a MemoryError traceback (a wrong
exit code and message) rather than in a swapping machine.
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest
from daemon_helpers import HOSTING, LABELS
from process_helpers import SHYPED

from shyped.fileio.boundedread import InputFileError, read_bounded
from shyped.service.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
_AS_LIMIT = 1 << 30


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_AS_LIMIT, _AS_LIMIT))


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHYPED, "--config", str(config), "check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        preexec_fn=_limit,
    )


def config(
    tmp: Path, *, policy: str = str(HOSTING), labels: str = str(LABELS), extra: str = ""
) -> Path:
    path = tmp / "shyped.toml"
    path.write_text(f'[policy]\npath = "{policy}"\nlabels = "{labels}"\n{extra}')
    return path


def test_check_accepts_the_plain_config(tmp_path: Path) -> None:
    result = check(config(tmp_path))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("which", ["labels", "policy"])
def test_dev_zero_is_refused_with_a_clear_error(tmp_path: Path, which: str) -> None:
    cfg = config(tmp_path, **{which: "/dev/zero"})  # type: ignore[arg-type]
    result = check(cfg)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "/dev/zero" in result.stderr and "must be a regular file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("which", ["labels", "policy"])
def test_a_file_over_the_cap_is_refused_naming_the_cap(tmp_path: Path, which: str) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros, more than every cap
    result = check(config(tmp_path, **{which: str(big)}))  # type: ignore[arg-type]
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(big) in result.stderr and "MiB accepted" in result.stderr


def test_a_fifo_config_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "shyped.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="regular file"):
        load_config(fifo)


def test_a_config_over_its_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shyped.toml"
    path.write_text("# " + "x" * (300 * 1024) + "\n")
    with pytest.raises(ConfigError, match="KiB accepted"):
        load_config(path)


def test_read_bounded_reads_up_to_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    assert read_bounded(path, 100, "file") == b"a" * 100
    with pytest.raises(InputFileError, match="more than the 99 bytes accepted"):
        read_bounded(path, 99, "file")
    with pytest.raises(InputFileError, match="regular file"):
        read_bounded(tmp_path, 100, "file")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[actuator]\ntimeout = 1e400\n", "actuator.timeout"),
        ("[actuator]\ntimeout = nan\n", "actuator.timeout"),
        ("[actuator]\ntimeout = 0\n", "actuator.timeout"),
        ('[control]\nsocket = ""\n', "control.socket"),
        ('[xenstore]\nsocket = ""\n', "xenstore.socket"),
        ("[xenstore]\nreconnect_max_backoff = inf\n", "xenstore.reconnect_max_backoff"),
        ("[enforcement]\ndevice_close_timeout = nan\n", "enforcement.device_close_timeout"),
        ('[control]\nread_group = ""\n', "control.read_group"),
        ('[control]\nadmin_group = "no-such-group-shyped-x"\n', "control.admin_group"),
        ('[actuator]\nxl = ""\n', "actuator.xl"),
        ('[audit]\ndirectory = ""\n', "audit.directory"),
    ],
)
def test_check_refuses_what_start_would_refuse(tmp_path: Path, extra: str, message: str) -> None:
    result = check(config(tmp_path, extra=extra))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("policy", ["", "."])
def test_policy_and_labels_paths_must_name_files(tmp_path: Path, policy: str) -> None:
    with pytest.raises(ConfigError, match=r"policy\.path"):
        parse_config(f'[policy]\npath = "{policy}"\n', tmp_path / "shyped.toml")
    with pytest.raises(ConfigError, match=r"policy\.labels"):
        parse_config(f'[policy]\npath = "p.toml"\nlabels = "{policy}"\n', tmp_path / "s.toml")
