"""One disk-spec reading: shyped's ``parse_disk_spec(s)`` against Debian's real
``xlu_disk_parse`` (libxlutil.so.4.17), the function ``xl create`` and ``xl block-attach`` use.

For every spec (a corpus of tricky ones, then hypothesis' own): either shyped refuses it, or
libxl reads it without error and both agree on target, format, vdev, access, cdrom, backend
type, script, backend domain and discard. Zero disagreements accepted. The red team's: libxl
strips every deprecated prefix (``file:phy:/img/a.img`` is ``/img/a.img``), drops one final
comma after ``target=``, lets a positional access override ``access=``, skips the positional
format slot once ``format=`` is given, and knows ``ioemu:``/``tapdisk:``/``nbd:``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libxlutil_helpers import load_with_disks

from shyped.core.xlcfg import DiskSpec, XlConfigError, parse_disk_spec, parse_disk_specs

LIB = load_with_disks()
pytestmark = pytest.mark.skipif(LIB is None, reason="Debian's libxl 4.17 libraries not installed")


def _ours(disk: DiskSpec) -> dict[str, Any]:
    return {
        "target": disk.target,
        "format": disk.format,
        "vdev": disk.vdev,
        "readwrite": int(disk.readwrite),
        "cdrom": int(disk.cdrom),
        "backendtype": disk.backendtype or "unknown",
        "script": disk.script,
        "backend": str(disk.backend_domid),
        "discard": disk.discard,
    }


def _theirs(disk: dict[str, Any]) -> dict[str, Any]:
    return {
        "target": disk.get("pdev_path") or "",
        "format": disk.get("format", "unknown"),
        "vdev": disk.get("vdev"),
        "readwrite": disk.get("readwrite", 0),
        "cdrom": disk.get("is_cdrom", 0),
        "backendtype": disk.get("backend", "unknown"),
        "script": disk.get("script"),
        "backend": disk.get("backend_domname") or "0",
        "discard": disk.get("discard_enable", "True") == "True",  # libxl's default: on
    }


def disagreement(specs: list[str]) -> str | None:
    """None if shyped refuses `specs` or both read them alike; else what differs."""
    try:
        ours = parse_disk_specs(specs)
    except XlConfigError:
        return None
    assert LIB is not None
    theirs = LIB.disk([s.encode() for s in specs])
    if isinstance(theirs, int):
        return f"libxl refuses {specs!r} (rc {theirs}) but shyped read {ours!r}"
    mine, lib = _ours(ours), _theirs(theirs)
    if mine != lib:
        diff = {k: (mine[k], lib[k]) for k in mine if mine[k] != lib[k]}
        return f"{specs!r}: (shyped, libxl) differ on {diff!r}"
    return None


CORPUS = [
    # the red team's
    "file:phy:/img/a.img,xvda,w",
    "vdev=xvda,tap:/img/b.img",
    "target=/img/b.img,",
    "vdev=xvda,target=/img/b.img,",
    "vdev=xvda,target=/img/b.img,,",
    "/img/a.img,access=r,qcow2,vdev=xvda,rw",
    "format=raw,/img/a.img,xvda,r",
    "ioemu:/img/a.img,xvda",
    "tapdisk:/img/a.img,xvda",
    "nbd:/img/a.img,,xvda",
    "nbd:host:1234,xvda",
    "iscsi:iqn.2001-05.com.example:disk,xvda",
    "drbd:res0,xvda,w",
    "raw:qcow2:/x,xvda",
    "raw:raw:/x,xvda",
    # the documented forms (xl-disk-configuration(5))
    "/dev/vg/guest-volume,,hda",
    "/dev/vg/guest-volume,raw,hda,rw",
    "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
    "raw:/dev/vg/guest-volume,hda,w",
    "phy:/dev/vg/guest-volume,hda,w",
    "/root/image.iso,,hdc,cdrom",
    "/root/image.iso,,hdc,devtype=cdrom",
    "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
    "raw:/root/image.iso,hdc:cdrom,ro",
    ",,hdc:cdrom,r",
    ",hdc:cdrom,r",
    "cdrom,vdev=hdc",
    "vdev=hdc,devtype=cdrom",
    "format=empty,vdev=hdc,devtype=cdrom,access=r",
    "file:/img.iso,hdc:cdrom,r",
    "tap:aio:/img/a.img,xvda,w",
    "tap2:aio:/img/a.img,xvda,w",
    "tap:qcow2:/img/a.qcow2,xvda,w",
    "tap:vhd:/img/a.vhd,xvda,w",
    "qcow2:/img/a.qcow2,xvda,w",
    "aio:/img/a.img,xvda,w",
    "format=raw,vdev=xvda,access=rw,target=/img,with,commas",
    "backendtype=phy,/dev/vg/a,,xvda",
    "backendtype=qdisk,/img/a.img,raw,xvda,w",
    "backendtype=tap,backendtype=phy,/x,,xvda",
    "backendtype=standalone,/x,,xvda",
    "script=block-iscsi,vdev=xvda,target=iqn.2001-05.com.example:disk",
    "nbd:/x,script=block-x,xvda",
    "backend=0,/x,,xvda",
    "backend=3,/x,,xvda",
    "backend=0x3,/x,,xvda",
    "backend=007,/x,,xvda",
    "backend=,/x,,xvda",
    "backend=driverdom,/x,,xvda",
    "/x,,xvda,discard",
    "/x,,xvda,no-discard",
    "/x,,xvda,direct-io-safe",
    "/x,,xvda,trusted",
    "trusted,raw,xvda",
    "/x,,xvda,untrusted",
    "colo,/x,,xvda",
    "/x,raw,colo,xvdb",
    "/x,raw,no-colo,xvdb",
    "/x,raw,colo,r",
    "/x,raw,xvda,no-colo",
    "colo-port=1,/x,raw,xvdb",
    "specification=xen,/x,,xvda",
    # leading and trailing blanks
    "  /img/a.img,  raw,  xvda,  r",
    "/img/a.img ,raw,xvda",
    "/img/a.img,raw ,xvda",
    "/img/a.img,raw,xvda ,r",
    "/img/a.img,raw,xvda,r ",
    "/img/a.img,raw,xvda,r,  ",
    "/img/a.img,raw,xvda,r, ,",
    "vdev=xvda,target= /img/a.img",
    "vdev=xvda,target=/img/a.img ",
    "vdev= xvda,/img/a.img",
    "format= raw,/x,,xvda",
    "format =raw,/x,,xvda",
    " format=raw,/x,,xvda",
    "phy: /dev/x,xvda",
    "/img/my disk.img,raw,xvda",
    "\t/img/a.img,raw,xvda",
    "/img/a.img\t,raw,xvda",
    "/img/a.img,raw,xvda\n",
    "vdev=xvda,target=/img/a\nb",
    # slots, empties, repeats
    "/x,,xvda,",
    "/x,,xvda,,",
    "/x,,xvda,r,",
    "/x,,,xvda",
    "/x,,xvda,r,w",
    "/img/a.img,xvda,r",
    "/img/a.img,xvda, ",
    ",/img/a.img,xvda",
    ",raw,xvda",
    "vdev=,vdev=xvda,/x",
    "vdev=xvda,vdev=xvdb,/x",
    "vdev=xvda,/x,raw,xvdb",
    "vdev=xvda,/x,raw,r",
    "/x,raw,xvda:disk",
    "/x,raw,xvda:cdrom",
    "/x,raw,xvda:floppy",
    "/x,raw,a:b:cdrom",
    "/x,xvda:cdrom",
    "cdrom,devtype=disk,/x,,xvda",
    "devtype=cdrom,/x,,xvda,w",
    "devtype=floppy,/x,,xvda",
    "format=qcow2,format=raw,/x,,xvda",
    "format=raw,format=raw,/x,,xvda",
    "access=r,/x,,xvda",
    "access=,/x,,xvda",
    "access=x,/x,,xvda",
    # colons, equals, unknown prefixes and keys
    "img:1,raw,xvda",
    "/img/a:b.img,raw,xvda",
    "xvda:,/x",
    "foo:/x,,xvda",
    "Phy:/x,,xvda",
    "phy:/x:y,,xvda",
    "/img/a=b.img,raw,xvda",
    "colour=red,/x,,xvda",
    "vdev=xvda,colour=red,target=/x",
    "=x,/x,,xvda",
    "/img",
    "/img,raw,xvda,rw,extra",
    "/img,bogusfmt,xvda",
    "",
    ",",
    "/img/é.img,raw,xvda",
    "vdev=xvdé,/x",
]


@pytest.mark.parametrize("spec", CORPUS)
def test_corpus_agrees_with_libxl_or_is_refused(spec: str) -> None:
    assert disagreement([spec]) is None


@pytest.mark.parametrize(
    "specs",
    [
        ["/img/a.img", "raw", "xvda", "r"],
        ["target=/img/a.img", "xvda"],
        ["vdev=xvda", "target=/img/a.img,"],
        ["phy:/dev/x", "xvda"],
        ["phy:", "/dev/x", "xvda", "w"],
        ["/x", "", "xvda", "r", "w"],
        ["format=raw", "/x,xvda"],
        ["/x,,xvda", "access=r"],
        # xl block-attach D 'format=raw,vdev=xvda,target=/a' access=r: read-only /a for xl
        # (each argument is scanned alone), `/a,access=r` if the arguments were joined by ","
        ["format=raw,vdev=xvda,target=/img/a.img", "access=r"],
        ["/x,", ",xvda"],
    ],
)
def test_block_attach_argument_lists_agree_with_libxl_or_are_refused(specs: list[str]) -> None:
    assert disagreement(specs) is None


def test_block_attach_arguments_are_scanned_one_by_one() -> None:
    d = parse_disk_specs(["format=raw,vdev=xvda,target=/img/a.img", "access=r"])
    assert (d.target, d.readwrite) == ("/img/a.img", False)


def test_the_red_team_forms_are_now_read_as_libxl_reads_them() -> None:
    """Not refused, read alike (the differential alone would pass on a refusal)."""
    assert parse_disk_spec("file:phy:/img/a.img,xvda,w").target == "/img/a.img"
    assert parse_disk_spec("vdev=xvda,tap:/img/b.img").target == "/img/b.img"
    assert parse_disk_spec("vdev=xvda,target=/img/b.img,").target == "/img/b.img"
    assert parse_disk_spec("/img/a.img,access=r,qcow2,vdev=xvda,rw").readwrite
    d = parse_disk_spec("format=raw,/img/a.img,xvda,r")
    assert (d.vdev, d.readwrite) == ("xvda", False)
    assert parse_disk_spec("ioemu:/img/a.img,xvda").target == "/img/a.img"
    assert parse_disk_spec("nbd:/img/a.img,xvda").script == "block-nbd"
    with pytest.raises(XlConfigError, match="format given twice"):
        parse_disk_spec("raw:qcow2:/x,xvda")


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("vdev=xvda,target= /img/a.img", "leading or trailing blanks"),
        ("vdev=xvda,target=/img/a.img ", "leading or trailing blanks"),
        ("/img/a.img ,raw,xvda", "leading or trailing blanks"),
        ("/img/a.img\t,raw,xvda", "control character"),
        ("vdev= xvda,/img/a.img", "vdev"),
        ("backend=0x3,/x,,xvda", "backend"),
        ("/x,raw,colo,xvdb", "COLO is not supported"),
        ("specification=xen,/x,,xvda", "unsupported parameter"),
    ],
)
def test_what_libxl_could_read_differently_is_refused_clearly(spec: str, why: str) -> None:
    with pytest.raises(XlConfigError, match=why):
        parse_disk_spec(spec)


_TOKENS = [
    "/img/a.img",
    "/img/b.img",
    "/img/a b.img",
    "a.img",
    "raw",
    "qcow2",
    "vhd",
    "empty",
    "xvda",
    "hda",
    "hdc:cdrom",
    "xvda:disk",
    "r",
    "w",
    "rw",
    "ro",
    "",
    " ",
    "format=raw",
    "format=",
    "vdev=xvda",
    "vdev=",
    "access=r",
    "access=w",
    "access=",
    "target=/img/b.img",
    "target=",
    "cdrom",
    "devtype=cdrom",
    "devtype=disk",
    "backendtype=phy",
    "backendtype=qdisk",
    "backend=1",
    "script=x",
    "discard",
    "no-discard",
    "direct-io-safe",
    "trusted",
    "phy:",
    "file:",
    "tap:",
    "tap2:",
    "aio:",
    "raw:",
    "qcow2:",
    "vhd:",
    "nbd:",
    "ioemu:",
    "tapdisk:",
    "foo:",
    "colo",
    "no-colo",
    "colo-port=1",
    "specification=xen",
    "grant_usage=1",
    "=",
    ":",
]


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_TOKENS),
            st.sampled_from([",", ",", ",", "", " ,", ", ", ":"]),
        ),
        min_size=1,
        max_size=7,
    ),
    st.booleans(),
)
def test_generated_specs_agree_with_libxl_or_are_refused(
    parts: list[tuple[str, str]], last_sep: bool
) -> None:
    spec = "".join(t + sep for t, sep in parts)
    if not last_sep:
        spec = spec[: -len(parts[-1][1])] if parts[-1][1] else spec
    assert disagreement([spec]) is None


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet=st.sampled_from(list("ab/:=, -.xrwvdhc\t")), max_size=16))
def test_generated_strings_agree_with_libxl_or_are_refused(spec: str) -> None:
    assert disagreement([spec]) is None


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=5))
def test_generated_argument_lists_agree_with_libxl_or_are_refused(specs: list[str]) -> None:
    assert disagreement(specs) is None
