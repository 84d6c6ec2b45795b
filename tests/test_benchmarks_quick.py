"""The benchmarks' ``--quick`` modes, as CI's smoke run (issue 15): the daemon end to end on a
sandbox oxenstored, every decision made. No time is asserted (machines here are noisy); a run
fails only when a domain is not admitted, a child hangs or the output is not what the report
reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick(script: str) -> dict[str, object]:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out: dict[str, object] = json.loads(run.stdout)
    return out


@pytest.mark.slow
def test_bench_daemon_quick_decides_every_kind() -> None:
    sizes = quick("bench_daemon.py")["sizes"]
    assert isinstance(sizes, list) and sizes
    latency = sizes[0]["latency"]
    for kind in ("admit", "vif", "vchan"):
        assert latency[kind]["n"] == 20, kind  # every sample decided
        assert latency[kind]["median_us"] > latency["floor_echo"]["median_us"]


@pytest.mark.slow
def test_bench_daemon_scale_quick_admits_at_every_size() -> None:
    samples = quick("bench_daemon_scale.py")["samples"]
    assert isinstance(samples, dict)
    for size, got in samples["this"].items():
        # every domain present was decided and labelled at the start (dom0 counted), and
        # the admissions of a new domain were measured
        assert got["admitted"] == [int(size) + 1], size
        assert len(got["admit_p50_us"]) == 1 and got["admit_p50_us"][0] > 0, size
