"""What Saga and Msg share: a list of steps DTM runs, each with its payload."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional

from ._consts import DEFAULT_DTM
from ._trans import TransCore

__all__ = ["StepTrans"]


class StepTrans(TransCore):
    """A transaction whose steps DTM calls itself (Saga, Msg).

    :attr:`steps` and :attr:`payloads` are read-only snapshots: steps are added only through the
    checked ``add`` methods, and not once DTM may hold the transaction.
    """

    def __init__(self, dtm: Any = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)
        self._steps: list[dict[str, str]] = []
        self._payloads: list[str] = []

    @property
    def steps(self) -> tuple[Mapping[str, str], ...]:
        """The steps added so far, in order (read-only)."""
        return tuple(MappingProxyType(step) for step in self._steps)

    @property
    def payloads(self) -> tuple[str, ...]:
        """The encoded payload of each step, in order (read-only)."""
        return tuple(self._payloads)

    def _append_step(self, step: dict[str, str], payload: str) -> None:
        """Append a validated step, unless the content is frozen (checked under the lock)."""
        with self._lock:
            self._check_mutable("add a step")
            self._steps.append(step)
            self._payloads.append(payload)

    def _extra_body(self) -> dict[str, Any]:
        return {"steps": [dict(s) for s in self._steps], "payloads": list(self._payloads)}
