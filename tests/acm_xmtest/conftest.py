"""A fresh sandbox host per test for the port of Xen 4.1's xm-test ``security-acm`` suite.

Each test gets a real oxenstored, the sandbox toolstack as xl, and the real daemon
(``shyped --config …`` as a child process, `control_daemon_helpers.Host`), started with Xen
ACM's DEFAULT policy (what a host without a policy ran), then the xm-test policy loaded with
``shypectl setpolicy ACM xm-test`` as ``acm_utils.py`` did (``ACMSetPolicy``). The steps are
the operator's: ``shypectl`` for the ``xm`` security verbs, ``shype-xl create`` for ``xm
create``, the sandbox's xl for ``xm destroy``/``list``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from control_daemon_helpers import sandbox_host
from process_helpers import wait_until
from xmtest_helpers import TESTPOLICY, AcmHost

from shyped.sandbox.xenstored import SandboxXenstored


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[AcmHost]:
    """A booted sandbox host, its daemon started with the DEFAULT policy, then the xm-test
    policy set as ``acm_utils.py`` set it."""
    with sandbox_host(xenstored) as h:
        acm = AcmHost(h.xsd, h.ts, h.directory)
        try:
            acm.start()
            r = acm.setpolicy(TESTPOLICY)
            assert r.returncode == 0, r.stdout + r.stderr
            yield acm
            if acm.daemon is not None:
                # Let the daemon see the domains the test destroyed before it is stopped.
                wait_until(lambda: acm.guests_gone(), what="guests released")
        finally:
            h.daemon = acm.daemon
