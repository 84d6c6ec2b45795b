"""The policy parser's worker process: parse one submitted policy text under resource limits.

Run by `shyped.control.policyparse` as ``python -I -c … <package dir> <cpu s> <memory bytes>``;
reads a JSON request ``{"text", "filename", "format"}`` on stdin and writes one pickled answer on
stdout: ``("ok", Policy, format)`` or ``("error", code, message, details)``. It lowers its own
CPU-time and address-space limits before reading anything, so a pathological text (tomllib is
quadratic on dotted keys; deep nesting exhausts the recursion limit) costs at most those, in
this process only, never the daemon's reactor.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import sys
from typing import Any

#: Problems listed at most in an answer (as the reactor-side parser does).
MAX_PROBLEMS = 200


def _limit(cpu_seconds: int, memory_bytes: int) -> None:
    """Lower this process's priority and limits (the shipped unit allows setrlimit,
    prlimit64 and setpriority for this). Where a seccomp filter refuses them the parent's
    wall-clock timeout and the unit's MemoryMax=/TasksMax= are the bounds."""
    steps: list[tuple[Any, ...]] = [
        (os.nice, 19),  # the daemon's decisions come first
        (resource.setrlimit, resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1)),
        (resource.setrlimit, resource.RLIMIT_AS, (memory_bytes, memory_bytes)),
        (resource.setrlimit, resource.RLIMIT_CORE, (0, 0)),
        (resource.setrlimit, resource.RLIMIT_NOFILE, (16, 16)),
    ]
    for fn, *args in steps:
        with contextlib.suppress(OSError, ValueError):
            fn(*args)


def answer(request: dict[str, Any]) -> tuple[Any, ...]:
    """Parse the request's text: the answer tuple (see module docstring)."""
    from shyped.control import views
    from shyped.control.protocol import ControlError

    filename = str(request.get("filename", "<policy>"))
    try:
        policy, fmt = views.parse_policy(
            str(request["text"]), filename, str(request.get("format", "auto"))
        )
    except ControlError as exc:
        return ("error", str(exc.code), exc.message, exc.details)
    except RecursionError:
        why = f"{filename}: nested too deeply to parse (the policy does not load)"
        return ("error", "policy-invalid", why, {"problems": [why]})
    except MemoryError:
        why = f"{filename}: too large to parse within the parser's memory limit"
        return ("error", "policy-invalid", why, {"problems": [why]})
    except Exception as exc:  # a parser bug on hostile input: say so, no traceback
        why = f"{filename}: the policy parser failed ({type(exc).__name__})"
        return ("error", "policy-invalid", why, {"problems": [why]})
    return ("ok", policy, fmt)


def main(argv: list[str]) -> int:
    cpu_seconds, memory_bytes = int(argv[0]), int(argv[1])
    _limit(cpu_seconds, memory_bytes)
    request = json.loads(sys.stdin.buffer.read())
    out = answer(request)
    sys.stdout.buffer.write(pickle.dumps(out, protocol=5))
    sys.stdout.buffer.flush()
    return 0
