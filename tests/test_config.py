from pathlib import Path

import pytest

from shyped.config import ConfigError, DomainVeto, Mode, load_config, parse_config


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
        ('[policy]\npath = "p"\nbogus = 1\n', "unknown key(s) in [policy]: bogus"),
        ("[policy]\npath = 3\n", "policy.path must be a str"),
        ('[policy]\npath = "p"\n[metrics]\nport = 70000\n', "metrics.port must be 0..65535"),
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
