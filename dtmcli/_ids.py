"""Branch id allocation for TCC and XA (``01``, ``02``, ... and ``<parent>01`` when nested)."""

from __future__ import annotations

import threading

from ._consts import MAX_CHILDREN, MAX_PARENT_ID_LEN
from .errors import DtmInvalidInput

__all__ = ["BranchIdGenerator"]


class BranchIdGenerator:
    """Thread-safe generator of sub-branch ids under ``parent`` (``""`` for a global transaction)."""

    def __init__(self, parent: str = "") -> None:
        if len(parent) >= MAX_PARENT_ID_LEN:
            raise DtmInvalidInput(
                f"branch id {parent!r} is too deep to nest under: parent ids must be shorter than "
                f"{MAX_PARENT_ID_LEN} characters"
            )
        self.parent = parent
        self._count = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        """The next id; at most 99 per parent."""
        with self._lock:
            if self._count >= MAX_CHILDREN:
                raise DtmInvalidInput(f"more than {MAX_CHILDREN} branches under {self.parent or 'the transaction'!r}")
            self._count += 1
            return f"{self.parent}{self._count:02d}"
