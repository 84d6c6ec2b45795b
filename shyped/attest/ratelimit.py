"""Token buckets per key (a uid): at most `burst` at once, refilled at `per_minute`.

Written here (~40 lines, pure, the clock passed in) rather than taken from a library: no
rate-limiting package is in Debian's or the project's dependencies, and the ones on PyPI
(pyrate-limiter, limits) bring storage back-ends, threads or asyncio this one caller does not
need. Fail closed: past `max_keys` tracked keys (after dropping the full buckets, which carry no
state), a new key is refused as if its bucket were empty.
"""

from __future__ import annotations

import attrs


@attrs.define
class TokenBuckets:
    per_minute: float
    burst: int
    max_keys: int = 4096
    #: key -> (tokens, when they were counted)
    _buckets: dict[int, tuple[float, float]] = attrs.field(factory=dict, init=False)

    def _level(self, key: int, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + max(0.0, now - at) * self.per_minute / 60.0)

    def take(self, key: int, now: float) -> float | None:
        """Take a token for `key` at time `now` (monotonic seconds): None if taken, else the
        seconds until one is there (nothing taken)."""
        tokens = self._level(key, now)
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._buckets = {
                k: (t, at)
                for k, (t, at) in self._buckets.items()
                if self._level(k, now) < self.burst
            }
            if len(self._buckets) >= self.max_keys:
                return 60.0 / self.per_minute
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) * 60.0 / self.per_minute
        self._buckets[key] = (tokens - 1.0, now)
        return None
