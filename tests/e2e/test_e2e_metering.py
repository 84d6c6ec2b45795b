"""Hypervisor metering on real Xen (issue 16): shyped in the e2e dom0 reads libxenstat every 2 s;
a guest spinning its vCPU and a guest pinging dom0 over its vif and writing its vbd
(tests/e2e/scenarios/metering.sh). Two scrapes of the metrics endpoint, 12 s apart, each
followed at once by `xl list` and `xentop -b`: CPU seconds, vif bytes and vbd bytes grow between
the scrapes and agree with what xl and xentop print (a scrape's sample is at most one metering
interval older than them, never newer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from metrics_helpers import MIB, parse_scrape, value
from runner import RunResult

from shyped.service.xlcpu import parse_xl_list

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

FILES = Path(__file__).parent / "metering"
#: How much older than xl/xentop a scrape's sample may be: the metering interval (2 s) plus the
#: scrape itself on an emulated CPU shared with a spinning guest, generously.
STALE_S = 20.0


@pytest.fixture(scope="module")
def run(e2e_run: Callable[..., RunResult]) -> RunResult:
    files = {p.name: p.read_bytes() for p in sorted(FILES.iterdir()) if p.is_file()}
    return e2e_run("metering", files)


def xentop(text: str) -> dict[str, dict[str, str]]:
    """`xentop -b -i 1 -f` rows by name (header column -> value; guests only: dom0's
    ``no limit`` MAXMEM splits into two words)."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    head = next(i for i, parts in enumerate(lines) if parts and parts[0] == "NAME")
    names = lines[head]
    rows = [p for p in lines[head + 1 :] if len(p) == len(names)]
    return {p[0]: dict(zip(names, p, strict=True)) for p in rows}


def test_cpu_net_and_block_grow_and_agree_with_xl_and_xentop(run: RunResult) -> None:
    burner = run.text("burner.domid").strip()
    io = run.text("io.domid").strip()
    scrapes = [parse_scrape(run.text(f"scrape-{n}.txt")) for n in (1, 2)]
    xl = [{r.name: r for r in parse_xl_list(run.text(f"xl-list-{n}.txt"))} for n in (1, 2)]
    top = [xentop(run.text(f"xentop-{n}.txt")) for n in (1, 2)]

    def cpu(s: list[tuple[str, dict[str, str], float]], domid: str) -> float:
        return value(s, "shyped_xen_domain_cpu_seconds_total", domid=domid)

    def rx(s: list[tuple[str, dict[str, str], float]]) -> float:
        return value(s, "shyped_xen_vif_receive_bytes_total", domid=io, vif="0")

    def written(s: list[tuple[str, dict[str, str], float]]) -> float:
        return value(s, "shyped_xen_vbd_write_bytes_total", domid=io, vbd="51712")

    for s, xl_n, top_n in zip(scrapes, xl, top, strict=True):
        assert value(s, "shyped_xen_metering_up", source="xenstat") == 1
        assert value(s, "shyped_domain_info", domid=burner, domain="burner", label="work") == 1
        # CPU: the scrape's sample was taken before xl list (xl prints tenths)
        for name, domid in (("burner", burner), ("io", io)):
            seen = cpu(s, domid)
            assert seen <= xl_n[name].cpu_seconds + 0.1, (name, seen, xl_n[name])
            assert xl_n[name].cpu_seconds - seen <= STALE_S, (name, seen, xl_n[name])
            assert seen <= float(top_n[name]["CPU(sec)"]) + 1
        # memory in use: the pages xl list counts too
        mem = value(s, "shyped_xen_domain_memory_bytes", domid=burner)
        assert 88 * MIB <= mem <= 100 * MIB
        # the vif: what dom0's vif<io>.0 received from the guest (xentop's NETRX, KiB)
        assert rx(s) <= (int(top_n["io"]["NETRX(k)"]) + 1) * 1024
        # the vbd: written sectors x 512 (xentop's VBD_WSECT)
        assert written(s) <= int(top_n["io"]["VBD_WSECT"]) * 512

    first, second = scrapes
    for n, (s, xl_n, top_n) in enumerate(zip(scrapes, xl, top, strict=True), 1):
        print(  # the figures, for the record (pytest -s)
            f"scrape {n}: burner CPU {cpu(s, burner):.2f} s (xl {xl_n['burner'].cpu_seconds}, "
            f"xentop {top_n['burner']['CPU(sec)']}); io vif0 from guest {rx(s):.0f} B (xentop "
            f"NETRX {top_n['io']['NETRX(k)']} KiB); io xvda written {written(s):.0f} B "
            f"(xentop VBD_WSECT {top_n['io']['VBD_WSECT']} x 512)"
        )
    assert cpu(second, burner) - cpu(first, burner) >= 1.0  # 12 s at up to a quarter CPU
    assert rx(second) > rx(first) > 0
    assert written(second) > written(first) > 0
    assert value(second, "shyped_xen_vif_receive_packets_total", domid=io, vif="0") > value(
        first, "shyped_xen_vif_receive_packets_total", domid=io, vif="0"
    )
    assert value(second, "shyped_xen_vbd_write_requests_total", domid=io, vbd="51712") > 0
    assert value(second, "shyped_xen_domain_vcpu_seconds_total", domid=burner, vcpu="0") > 0
