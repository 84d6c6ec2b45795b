"""Submitted policy texts are parsed in a limited worker process (`shyped.control.policyparse`):
a good text gives the same policy as the in-process parser, pathological ones a clean
`policy-invalid`, and the worker's answer cannot make the daemon build anything else."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from shyped.control import views
from shyped.control.policyparse import ParseLimits, _decode, parse_isolated
from shyped.control.protocol import ControlError, ErrorCode

HOSTING = Path(__file__).resolve().parents[1] / "conf" / "policies" / "hosting.toml"


@pytest_twisted.ensureDeferred
async def test_a_good_policy_parses_as_in_process() -> None:
    text = HOSTING.read_text()
    policy, fmt = await parse_isolated(reactor, text, "hosting.toml")
    assert (policy, fmt) == views.parse_policy(text, "hosting.toml")


@pytest_twisted.ensureDeferred
async def test_problems_are_reported_as_in_process() -> None:
    text = HOSTING.read_text().replace('bootstrap = "dom0"', 'bootstrap = "nobody"')
    with pytest.raises(ControlError) as here:
        views.parse_policy(text, "p.toml")
    with pytest.raises(ControlError) as there:
        await parse_isolated(reactor, text, "p.toml")
    assert there.value.code is ErrorCode.POLICY_INVALID
    assert (there.value.message, there.value.details) == (here.value.message, here.value.details)


@pytest_twisted.ensureDeferred
async def test_pathological_texts_are_policy_invalid() -> None:
    limits = ParseLimits(cpu_seconds=1, slack=3.0)
    with pytest.raises(ControlError) as nested:
        await parse_isolated(reactor, "x = " + "[" * 5000 + "]" * 5000, "deep.toml", "auto")
    assert nested.value.code is ErrorCode.POLICY_INVALID
    assert "nested too deeply" in str(nested.value.details["problems"])
    with pytest.raises(ControlError) as dotted:
        await parse_isolated(reactor, "a." * 31000 + "b = 1", "dotted.toml", "auto", limits)
    assert dotted.value.code is ErrorCode.POLICY_INVALID
    assert "limit" in dotted.value.message


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_the_answer_may_only_hold_policy_classes() -> None:
    with pytest.raises(ControlError) as err:
        _decode(pickle.dumps(("ok", _Evil(), "toml")))
    assert err.value.code is ErrorCode.POLICY_INVALID
    with pytest.raises(ControlError):
        _decode(pickle.dumps(("error", "not-a-code", "m", {})))
    with pytest.raises(ControlError):
        _decode(b"garbage")


def test_no_function_of_the_policy_package_is_called_from_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only classes: pickle calls whatever callable an answer names (red-team suspicion)."""
    import shyped.policy.toml_format as toml_format

    raw = pickle.dumps(("ok", _CallsPolicyFunction(), "toml"))  # names toml_format.loads
    called: list[str] = []
    monkeypatch.setattr(toml_format, "loads", called.append)  # what the unpickler would find
    with pytest.raises(ControlError) as err:
        _decode(raw)
    assert err.value.code is ErrorCode.POLICY_INVALID and called == []


class _CallsPolicyFunction:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        from shyped.policy.toml_format import loads

        return (loads, ("[policy]\n",))
