"""Policy decisions per second with few vs many running domains.

Builds a synthetic policy (1,000 VM labels by default, overlapping Chinese Wall conflict sets,
MLS levels on most labels, resource labels), fills one running set with 10 domains and another
with 10,000 (all admitted through the Chinese Wall, so the state is one a host could be in), then
times the same stream of decisions against both. The cost of a decision must not grow with the
number of running domains: the last column is the rate ratio (large / small; ~1.0 expected).
A brute-force admission that scans the running domains is timed too, as the contrast.

Run: .venv/bin/python benchmarks/bench_policy.py [--help]
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable, Sequence

from shyped.policy.chinese_wall import RunningSet
from shyped.policy.decisions import Hook, PolicyEngine
from shyped.policy.model import (
    ConflictSet,
    MlsLabel,
    Policy,
    PolicyVersion,
    ResourceLabel,
    VmLabel,
)

LEVELS = ["public", "internal", "confidential", "secret"]
CATEGORIES = [f"cat{i}" for i in range(8)]


def build_policy(n_labels: int, rng: random.Random) -> Policy:
    """A policy shaped like a big multi-tenant host."""
    ste = [f"ste{i}" for i in range(max(4, n_labels // 10))]
    cw = [f"cw{i}" for i in range(max(8, n_labels // 5))]
    sets = [ConflictSet(f"set{i}", cw[i * 4 : i * 4 + 4]) for i in range(len(cw) // 4)]
    set_of = {t: cs.name for cs in sets for t in cs.types}
    labels = [VmLabel("dom0", ste, ["cw0"])]
    for i in range(1, n_labels):
        picked: dict[str, str] = {}
        for t in rng.sample(cw, 2):  # at most one type per conflict set (a valid label)
            picked.setdefault(set_of.get(t, t), t)
        mls = (
            MlsLabel(rng.choice(LEVELS), rng.sample(CATEGORIES, rng.randint(0, 2)))
            if rng.random() < 0.8
            else None
        )
        labels.append(VmLabel(f"vm{i}", rng.sample(ste, rng.randint(1, 3)), picked.values(), mls))
    resources = [
        ResourceLabel(
            f"res{i}",
            rng.choice(ste),
            MlsLabel(rng.choice(LEVELS), rng.sample(CATEGORIES, rng.randint(0, 1)))
            if rng.random() < 0.7
            else None,
        )
        for i in range(n_labels // 2)
    ]
    return Policy(
        name="bench.policy",
        version=PolicyVersion(1, 0),
        bootstrap="dom0",
        ste_types=ste,
        cw_types=cw,
        conflict_sets=sets,
        vm_labels=labels,
        resource_labels=resources,
        mls_levels=LEVELS,
        mls_categories=CATEGORIES,
    )


def fill(engine: PolicyEngine, n: int, rng: random.Random) -> tuple[RunningSet, list[VmLabel]]:
    """A running set with `n` admitted domains (labels repeat: same label runs side by side)."""
    rs = RunningSet(engine)
    rs.start("dom0")
    running = [engine.policy.bootstrap_label]
    names = [lab.name for lab in engine.policy.vm_labels]
    admitted: list[str] = []
    while len(running) < n:
        name = rng.choice(admitted) if admitted and rng.random() < 0.7 else rng.choice(names)
        if rs.try_start(name).permitted:
            admitted.append(name)
            lab = engine.policy.vm_label(name)
            assert lab is not None
            running.append(lab)
    return rs, running


def brute_force_admit(policy: Policy, running: Sequence[VmLabel], label: VmLabel) -> bool:
    """Admission by scanning the running domains: what the counts avoid."""
    for r in running:
        for cs in policy.conflict_sets_of(next(iter(r.cw_types), "")):
            if label.cw_types & (cs.types - r.cw_types):
                return False
    return True


def rates(fns: Sequence[Callable[[], object]], n: int, repeat: int) -> list[float]:
    """Best-of-`repeat` decisions per second of each `fn` (each performs `n` decisions).

    The functions are timed in turn, `repeat` rounds, so load from elsewhere on the machine
    hits them alike; the garbage collector is paused while timing.
    """
    best = [float("inf")] * len(fns)
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    finally:
        gc.enable()
    return [n / b for b in best]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--labels", type=int, default=1000, help="VM labels in the policy (1000)")
    ap.add_argument("--small", type=int, default=10, help="running domains, small host (10)")
    ap.add_argument("--large", type=int, default=10_000, help="running domains, large (10000)")
    ap.add_argument("--queries", type=int, default=100_000, help="decisions per timing (100000)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per cell, best kept (3)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (1)")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    policy = build_policy(args.labels, rng)
    build_s = time.perf_counter() - t0
    names = [lab.name for lab in policy.vm_labels]
    res_names = [r.name for r in policy.resource_labels]
    q = args.queries

    subjects = [rng.choice(names) for _ in range(q)]
    hot_pairs = [(rng.choice(names), rng.choice(names)) for _ in range(2000)]
    hot = [rng.choice(hot_pairs) for _ in range(q)]
    cold = [(rng.choice(names), rng.choice(names)) for _ in range(q)]
    res_q = [(rng.choice(names), rng.choice(res_names), rng.random() < 0.5) for _ in range(q)]

    rows: list[tuple[str, float, float]] = []
    states = {}
    for size in (args.small, args.large):
        engine = PolicyEngine(policy)
        states[size] = (engine, *fill(engine, size, random.Random(args.seed + size)))

    def cell(make: Callable[[int], Callable[[], object]], n: int) -> tuple[float, float]:
        small, large = rates([make(args.small), make(args.large)], n, args.repeat)
        return small, large

    small_rs, large_rs = states[args.small][1], states[args.large][1]
    verdicts = {s: (small_rs.admit(s).permitted, large_rs.admit(s).permitted) for s in names}
    permit_both = [s for s in subjects if verdicts[s] == (True, True)]
    deny_both = [s for s in subjects if verdicts[s] == (False, False)]

    def admission(stream: list[str]) -> Callable[[int], Callable[[], object]]:
        def make(size: int) -> Callable[[], object]:
            rs = states[size][1]
            return lambda: [rs.admit(s) for s in stream]

        return make

    def channel(pairs: list[tuple[str, str]], fresh: bool) -> Callable[[int], Callable[[], object]]:
        def make(size: int) -> Callable[[], object]:
            def run() -> object:
                eng = PolicyEngine(policy) if fresh else states[size][0]
                return [eng.channel(Hook.VCHAN, a, b) for a, b in pairs]

            return run

        return make

    def grant(size: int) -> Callable[[], object]:
        eng = states[size][0]
        return lambda: [eng.grant(a, b, writable=False) for a, b in hot]

    def resource(fresh: bool) -> Callable[[int], Callable[[], object]]:
        def make(size: int) -> Callable[[], object]:
            def run() -> object:
                eng = PolicyEngine(policy) if fresh else states[size][0]
                return [eng.resource(d, r, writable=w) for d, r, w in res_q]

            return run

        return make

    def scan(size: int) -> Callable[[], object]:
        _, _, running = states[size]
        labs = [policy.vm_label(s) for s in subjects[: q // 100]]
        return lambda: [brute_force_admit(policy, running, lab) for lab in labs if lab]

    rows.append(("admission, random labels", *cell(admission(subjects), q)))
    if permit_both:
        rows.append(
            ("admission, permitted on both", *cell(admission(permit_both), len(permit_both)))
        )
    if deny_both:
        rows.append(("admission, denied on both", *cell(admission(deny_both), len(deny_both))))
    rows.append(("vchan, 2k hot label pairs", *cell(channel(hot, False), q)))
    rows.append(("vchan, new engine, random pairs", *cell(channel(cold, True), q)))
    rows.append(("grant read-only, hot pairs", *cell(grant, q)))
    rows.append(("resource, random (mostly misses)", *cell(resource(False), q)))
    rows.append(("resource, new engine", *cell(resource(True), q)))
    rows.append(("reference: admission by scan", *cell(scan, q // 100)))

    deny = sum(not large_rs.admit(s).permitted for s in subjects[:1000])
    print(
        f"policy: {args.labels} VM labels, {len(policy.resource_labels)} resource labels, "
        f"{len(policy.conflict_sets)} conflict sets (built in {build_s * 1000:.0f} ms); "
        f"admission denies {deny / 10:.0f}% of the stream on the large host"
    )
    w = max(len(r[0]) for r in rows)
    small_h, large_h = f"running={args.small}", f"running={args.large}"
    print(f"{'decision':<{w}}  {small_h + ' /s':>18}  {large_h + ' /s':>20}  {'ratio':>6}")
    for name, a, b in rows:
        print(f"{name:<{w}}  {a:>18,.0f}  {b:>20,.0f}  {b / a:>6.2f}")
    print("ratio = rate with many running domains / rate with few (1.0: cost independent of N)")


if __name__ == "__main__":
    main()
