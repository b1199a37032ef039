"""The circuit breaker in front of a remote store, the error of a ``deny`` policy, and the
error that is not an outage (``StorageRejected``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import StorageError

logger = logging.getLogger("plangate.storage")


class StorageUnavailable(StorageError):
    """The backend cannot be reached and a counter's policy is ``deny`` (→ 503)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageRejected(StorageError):
    """The backend answered, with an error about this request's own data (a Redis error
    reply: a key of the wrong type, keys in different cluster slots, a script's error).
    Not an outage: the breaker does not count it; the request follows its failure policy."""


class CircuitBreaker:
    """Closed: calls go through. After ``failures`` consecutive failures: open, no calls for
    ``reset_after`` seconds. Then half-open: one probe call; its success closes the breaker,
    its failure opens it again. A probe that never reports (cancelled) is replaced after
    ``reset_after``."""

    def __init__(
        self,
        failures: int = 3,
        reset_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.reset_after = reset_after
        self.clock = clock
        self.state = "closed"
        self._failures = 0
        self._opened_at = 0.0  # when it opened, or when the current probe went out
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether a call may go to the backend now (in half-open state: only the probe)."""
        if self.state == "closed":
            return True
        with self._lock:
            if self.clock() - self._opened_at >= self.reset_after:
                self.state = "half-open"
                self._opened_at = self.clock()
                return True  # the probe
            return False

    def succeeded(self) -> bool:
        """Record a success; True if it closed an open breaker (the backend is back)."""
        if self.state == "closed" and not self._failures:
            return False
        with self._lock:
            recovered = self.state != "closed"
            self.state = "closed"
            self._failures = 0
            return recovered

    def failed(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._failures += 1
            if self.state == "half-open" or self._failures >= self.threshold:
                if self.state != "open":
                    logger.warning(
                        "storage circuit breaker open for %.1f s after %d failure(s): %r",
                        self.reset_after,
                        self._failures,
                        error,
                    )
                self.state = "open"
                self._opened_at = self.clock()

    @property
    def retry_after(self) -> float:
        """Seconds until the next probe (0 when closed)."""
        if self.state == "closed":
            return 0.0
        return max(0.0, self.reset_after - (self.clock() - self._opened_at))
