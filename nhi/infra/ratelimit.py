"""One call budget per provider account: a token bucket that slows down when the platform
throttles and recovers slowly.

Sweeps share it across their threads (`acquire` is thread-safe), so concurrency never exceeds
what NHI_SWEEP_CALLS_PER_SECOND allows, and a throttling platform is answered by less traffic,
not by retries piling on top of full speed (AIMD, as TCP does it: halve on a throttle, add a
little back per successful call).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Error codes AWS (and botocore) use for "too many requests".
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
    }
)
MIN_SHARE = 1 / 64  # never slower than this share of the configured rate
RECOVERY_CALLS = 100  # successful calls to win back the configured rate after one halving


class TokenBucket:
    """At most `rate` calls a second (bursts up to `burst`), adaptive to throttling."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.ceiling = rate
        self._rate = rate
        self._burst = burst if burst is not None else max(1.0, rate / 10)
        self._tokens = self._burst
        self._clock = clock
        self._sleep = sleep
        self._stamp = clock()
        self._lock = threading.Lock()
        self.throttles = 0  # how often the platform said "slow down" (reported by sweeps)

    @property
    def rate(self) -> float:
        """The rate in force now (below the ceiling after throttling)."""
        return self._rate

    def _refill(self, now: float) -> None:
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def acquire(self) -> None:
        """Take one call's token, waiting for it if the budget is spent."""
        with self._lock:
            now = self._clock()
            self._refill(now)
            self._tokens -= 1.0
            # A negative balance is a queue: each caller waits for its own place in it.
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)

    def __call__(self) -> None:
        self.acquire()

    def throttled(self) -> None:
        """The platform throttled a call: halve the rate (down to a floor)."""
        with self._lock:
            self._refill(self._clock())
            self._rate = max(self.ceiling * MIN_SHARE, self._rate / 2)
            self._tokens = min(self._tokens, 0.0)  # no burst right after a throttle
            self.throttles += 1

    def succeeded(self) -> None:
        """A call went through: win back a little of the configured rate."""
        with self._lock:
            if self._rate < self.ceiling:
                self._refill(self._clock())
                self._rate = min(self.ceiling, self._rate + self.ceiling / RECOVERY_CALLS)
