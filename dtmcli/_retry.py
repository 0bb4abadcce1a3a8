"""Explicit retry policy for calls that are safe to repeat (reads and ``prepare``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

from ._validate import check_non_negative_int
from .errors import DtmInvalidInput, DtmTransportError

__all__ = ["ExponentialBackoff", "Retry", "NO_RETRY"]

T = TypeVar("T")


@dataclass(frozen=True)
class ExponentialBackoff:
    """Sleep ``base * 2**attempt`` seconds, never more than ``cap``."""

    base: float = 0.05
    cap: float = 1.0

    def __post_init__(self) -> None:
        if not (self.base >= 0 and self.cap >= 0):
            raise DtmInvalidInput("backoff base and cap must be >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return float(min(self.cap, self.base * (2**attempt)))


@dataclass(frozen=True)
class Retry:
    """Retry a call up to ``retries`` more times when it fails at the transport level.

    Only idempotent calls use it: ``newGid``, ``query``, ``all``, ``ping``, ``version`` and
    ``prepare``. ``submit`` and ``abort`` are never repeated blindly (protocol.md §2: a resubmitted
    TCC/XA is marked succeeded without confirming); see ``submit(recover=True)``. ``sleep`` is what
    the sync client waits with; the asyncio client always awaits ``asyncio.sleep``.
    """

    retries: int = 2
    backoff: ExponentialBackoff = field(default_factory=ExponentialBackoff)
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        check_non_negative_int(self.retries, "retries")

    def next_delay(self, attempt: int, deadline: Optional[float], now: float) -> Optional[float]:
        """Seconds to wait before retry number ``attempt`` (0-based), or ``None`` to give up.

        Gives up after ``retries`` retries, and when the backoff would reach ``deadline`` (a
        ``time.monotonic()`` value, or ``None`` for no deadline) measured from ``now``.
        """
        if attempt >= self.retries:
            return None
        delay = self.backoff.delay(attempt)
        if deadline is not None and now + delay >= deadline:
            return None
        return delay

    def call(self, func: Callable[[], T], *, deadline: Optional[float] = None) -> T:
        """Run ``func``, retrying on DtmTransportError.

        ``deadline`` (a ``time.monotonic()`` value) bounds the whole call: no retry starts, and no
        backoff is slept, once it would be reached; the last error is raised instead.
        """
        attempt = 0
        while True:
            try:
                return func()
            except DtmTransportError:
                delay = self.next_delay(attempt, deadline, time.monotonic())
                if delay is None:
                    raise
                self.sleep(delay)
                attempt += 1


NO_RETRY = Retry(retries=0)
