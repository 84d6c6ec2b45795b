"""``dry_run`` on the control protocol: a label the caller names that the policy does not
have is an ``unknown-label`` error (exit 6 in the CLIs, with suggestions), not a DENIED answer;
a label the store holds for the domain is decided as the daemon would (denied)."""

from __future__ import annotations

import pytest
import pytest_twisted
from daemon_helpers import POLICY, Harness, host_fixture, uuid_of

from shyped.control import backend as b
from shyped.control.daemon_backend import DaemonControlBackend
from shyped.control.protocol import ControlError, ErrorCode

host = host_fixture


@pytest_twisted.ensureDeferred
async def test_dry_run_of_an_unknown_label_is_an_unknown_label_error(host: Harness) -> None:
    backend = DaemonControlBackend(await host.start())
    for label in ("shpo", f"ACM:{POLICY}:shpo"):
        with pytest.raises(ControlError) as exc:
            backend.dry_run(b.DryRunArgs(domain=b.NewDomain("new-1", uuid_of("new-1"), label)))
        assert exc.value.code is ErrorCode.UNKNOWN_LABEL, exc.value
        assert "unknown label 'shpo', did you mean 'shop'?" in exc.value.message
        assert exc.value.details["suggestions"] == ["shop"]
    # a resource label is not a VM label
    with pytest.raises(ControlError) as exc:
        backend.dry_run(b.DryRunArgs(domain=b.NewDomain("new-1", uuid_of("new-1"), "shop-disk")))
    assert exc.value.code is ErrorCode.UNKNOWN_LABEL
    assert "'shop-disk' is a resource label" in exc.value.message
    # another policy's label: invalid argument, as everywhere else
    with pytest.raises(ControlError) as exc:
        backend.dry_run(b.DryRunArgs(domain=b.NewDomain("new-1", None, "ACM:other:shop")))
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT
    # a known label is decided; no label in the cfg or the store: denied by the policy
    ok = backend.dry_run(b.DryRunArgs(domain=b.NewDomain("new-1", uuid_of("new-1"), "shop")))
    assert ok.permitted
    unlabelled = backend.dry_run(b.DryRunArgs(domain=b.NewDomain("new-1", uuid_of("new-1"))))
    assert not unlabelled.permitted
