"""Clocks for the coordinator: a manual one tests move by hand, and the real one."""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "RealClock"]


class Clock(Protocol):
    """What the coordinator needs from time: epoch seconds."""

    def now(self) -> float:
        """Current time in epoch seconds."""
        ...


class RealClock:
    """Wall-clock time."""

    def now(self) -> float:
        """``time.time()``."""
        return time.time()


class ManualClock:
    """A clock that only moves when told; starts at the current wall time so timestamps look real."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def now(self) -> float:
        """The frozen current time."""
        with self._lock:
            return self._now

    def set(self, when: float) -> None:
        """Move to ``when`` (never backwards)."""
        with self._lock:
            if when > self._now:
                self._now = when

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._now += seconds
