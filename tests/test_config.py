import re
from pathlib import Path

import pytest

from shyped.service.config import ConfigError, DomainVeto, Mode, load_config, parse_config


def test_minimal_config_gets_secure_defaults(tmp_path: Path) -> None:
    cfg = parse_config('[policy]\npath = "p.toml"\n', tmp_path / "shyped.toml")
    assert cfg.policy == tmp_path / "p.toml"
    assert cfg.mode is Mode.ENFORCING
    assert cfg.domain_veto is DomainVeto.DESTROY
    assert cfg.metrics.enabled is False and cfg.metrics.address == "127.0.0.1"
    assert str(cfg.control.socket).startswith("/run/shyped/")


def test_full_config(tmp_path: Path) -> None:
    text = """
[policy]
path = "/etc/shyped/policy.toml"
labels = "/var/lib/shyped/labels.json"
[enforcement]
mode = "permissive"
domain_veto = "pause"
[xenstore]
transport = "xenbus"
reconnect_max_backoff = 5
[actuator]
kind = "sandbox"
xl = ["python3", "-m", "shyped.sandbox", "xl"]
[metrics]
enabled = true
port = 9999
bearer_token_file = "metrics.token"
"""
    cfg = parse_config(text, tmp_path / "x.toml")
    assert cfg.mode is Mode.PERMISSIVE and cfg.domain_veto is DomainVeto.PAUSE
    assert cfg.xenstore.transport == "xenbus" and cfg.xenstore.reconnect_max_backoff == 5.0
    assert cfg.actuator.xl == ("python3", "-m", "shyped.sandbox", "xl")
    assert cfg.metrics.port == 9999


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "policy.path is required"),
        ('[policy]\npath = "p"\n[enforcement]\nmode = "lax"\n', "enforcement.mode must be one of"),
        ('[policy]\npath = "p"\nbogus = 1\n', "unknown key 'bogus' in [policy]"),
        ("[policy]\npath = 3\n", "policy.path must be a str"),
        ('[policy]\npath = "p"\n[metrics]\nport = 70000\n', "metrics.port must be in [0, 65535]"),
        ("[policy\n", "Expected ']'"),
        ('[policy]\npath = "p"\n[actuator]\nxl = []\n', "actuator.xl must be a command"),
    ],
)
def test_bad_config_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, Path("/etc/shyped/shyped.toml"))
    assert message in str(err.value)
    assert "/etc/shyped/shyped.toml" in str(err.value)


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.toml")


def test_audit_table_turns_the_trail_on_and_maps_to_audit_settings(tmp_path: Path) -> None:
    from shyped.service.auditlog import DiskFullAction

    off = parse_config('[policy]\npath = "p.toml"\n', tmp_path / "shyped.toml")
    assert off.audit.enabled is False
    text = """
[policy]
path = "p.toml"
[audit]
directory = "audit"
max_file_bytes = 4096
keep_files = 3
disk_full_action = "ignore"
retry_interval = 0.5
mirror_denials = true
group = "adm"
"""
    cfg = parse_config(text, tmp_path / "shyped.toml")
    assert cfg.audit.enabled is True
    settings = cfg.audit.settings()
    assert settings.directory == tmp_path / "audit"
    assert settings.max_file_bytes == 4096 and settings.keep_files == 3
    assert settings.disk_full_action is DiskFullAction.IGNORE
    assert settings.retry_interval == 0.5 and settings.mirror_denials and settings.group == "adm"
    default = parse_config('[policy]\npath = "p.toml"\n[audit]\n', tmp_path / "shyped.toml")
    assert default.audit.enabled and str(default.audit.directory) == "/var/log/shyped/audit"
    assert default.audit.settings().disk_full_action is DiskFullAction.FAIL_CLOSED


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('disk_full_action = "halt"', "audit.disk_full_action must be"),
        ("max_file_bytes = 10", "audit.max_file_bytes must be at least 1024"),
        ("keep_files = -1", "audit.keep_files"),
        ("mirror_denials = 1", "audit.mirror_denials must be a bool"),
        ("colour = 1", "unknown key 'colour' in [audit]"),
    ],
)
def test_bad_audit_table_names_the_key(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(f'[policy]\npath = "p.toml"\n[audit]\n{table}\n')


def test_every_config_error_at_once_with_lines_and_did_you_mean(tmp_path: Path) -> None:
    text = (
        '[policy]\npath = "p.toml"\nlables = "l.json"\n'  # 3
        '[control]\nsocket = ""\n'  # 5
        '[metrics]\naddress = "0.0.0.0"\nport = 99999\n'  # 7, 8
        "[audit]\nmax_file_bytes = 1000000000000\n"  # 10
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path / "shyped.toml")
    lines = str(err.value).splitlines()
    where = str(tmp_path / "shyped.toml")
    assert lines[0] == (
        f"{where}:3: unknown key 'lables' in [policy] (did you mean 'labels'? known: path, labels)"
    )
    assert lines[1].startswith(f"{where}:5: control.socket must name a file")
    assert lines[2].startswith(f"{where}:7: metrics.address '0.0.0.0' is not a loopback")
    assert lines[3].startswith(f"{where}:8: metrics.port must be in [0, 65535]")
    assert lines[4].startswith(
        f"{where}:10: audit.max_file_bytes must be at least 1024 and at most"
    )
    assert len(lines) == 5


GOOD_POLICY = Path(__file__).resolve().parent.parent / "conf" / "policies" / "hosting.toml"


@pytest.mark.parametrize(
    ("extra", "labels", "message"),
    [
        ('[metrics]\nenabled = true\nallow_unauthenticated = true\naddress = "0.0.0.0"\n', None,
         "not a loopback address"),
        ('[control]\nread_group = "no-such-group-shyped"\n', None, "no group named"),
        ('[audit]\ngroup = "no-such-group-shyped"\n', None, "no group named"),
        ('[xenstore]\nsocket = ""\n', None, "xenstore.socket must name a file"),
        ('[control]\nsocket = " "\n', None, "control.socket must name a file"),
        ("[metrics]\nport = -1\nfd_reserve = 1\n", None, "metrics.fd_reserve must be in"),
        ("[audit]\nkeep_files = 10000000000\n", None, "audit.keep_files must be"),
        ("[enforcement]\ndevice_close_timeout = 1e9\n", None, "device_close_timeout must be"),
        ("[enforcment]\n", None, "did you mean 'enforcement'?"),
        ("", '{"version": 1, "resources": {"relative.img": "shop-disk"}}', "invalid resource"),
        ("", '{"version": 1, "domain": {}}', "did you mean 'domains'?"),
        ('[metrics]\nenabled = true\nbearer_token_file = "missing.token"\n', None, "cannot open"),
    ],
)  # fmt: skip
def test_check_refuses_what_start_refuses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    labels: str | None,
    message: str,
) -> None:
    """Each config start refuses is refused by `shyped check` too, with the same message:
    both run `shyped.service.startcheck.validate_startup`."""
    from shyped.cli import main as cli
    from shyped.service import observability

    def started(*_: object) -> None:
        raise AssertionError("start got past its validation")

    monkeypatch.setattr(observability, "build_audit", started)
    store = tmp_path / "labels.json"
    if labels is not None:
        store.write_text(labels)
    cfg = tmp_path / "shyped.toml"
    cfg.write_text(f'[policy]\npath = "{GOOD_POLICY}"\nlabels = "{store}"\n{extra}')
    cfg.write_text(f'[policy]\npath = "{GOOD_POLICY}"\nlabels = "{tmp_path / "none.json"}"\n')
    assert cli.main(["--config", str(cfg), "check"]) == 0  # the baseline passes
    capsys.readouterr()
    cfg.write_text(f'[policy]\npath = "{GOOD_POLICY}"\nlabels = "{store}"\n{extra}')
    results = []
    for command in ("check", "run"):
        code = cli.main(["--config", str(cfg), command])
        results.append((code, capsys.readouterr().err))
    (check_code, check_err), (run_code, run_err) = results
    assert check_code == run_code == 2
    assert message in check_err and check_err == run_err


def test_check_and_start_refuse_a_bad_policy_with_every_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from shyped.cli import main as cli
    from shyped.service import observability

    def started(*_: object) -> None:
        raise AssertionError("start got past its validation")

    monkeypatch.setattr(observability, "build_audit", started)
    text = GOOD_POLICY.read_text()
    bad = text.replace('ste = ["bank-b"]', 'ste = ["bank-c"]').replace(
        'cw = ["public"]', "cw = []\nsize = 3"
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(bad)
    cfg = tmp_path / "shyped.toml"
    cfg.write_text(f'[policy]\npath = "{policy}"\nlabels = "{tmp_path / "l.json"}"\n')
    errs = []
    for command in ("check", "run"):
        assert cli.main(["--config", str(cfg), command]) == 2
        errs.append(capsys.readouterr().err)
    assert errs[0] == errs[1]
    lines = bad.splitlines()
    typo = next(i for i, s in enumerate(lines, 1) if s == 'ste = ["bank-c"]')
    size = next(i for i, s in enumerate(lines, 1) if s == "size = 3")
    assert f"{policy}:{typo}: VM label 'bank-b-web' names unknown STE type 'bank-c'" in errs[0]
    assert f"{policy}:{size}: unknown key 'size' in label 'shop'" in errs[0]


def test_a_policy_typo_in_an_array_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """`["a"} "b"]` (a `}` for a `,`): the line scanner behind the error message looped
    forever on it, growing without bound, so `shyped check`, start and a SIGHUP reload hung
    on a one-character typo. Run as an operator would, with a memory cap and a timeout."""
    import resource
    import subprocess
    import sys

    text = GOOD_POLICY.read_text()
    types = 'cw = ["system", "infra", "bank-a", "bank-b", "public"]'
    policy = tmp_path / "policy.toml"
    policy.write_text(text.replace(types, types.replace('"infra",', '"infra"}')))
    cfg = tmp_path / "shyped.toml"
    cfg.write_text(f'[policy]\npath = "{policy}"\nlabels = "{tmp_path / "l.json"}"\n')

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    r = subprocess.run(
        [sys.executable, "-m", "shyped.cli.main", "--config", str(cfg), "check"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=cap,
        check=False,
    )
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s == types)
    assert r.returncode == 2, r.stderr
    assert f"{policy}:{line}:24: TOML syntax: Unclosed array" in r.stderr
