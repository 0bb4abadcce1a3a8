"""Sub-transaction barrier: idempotency, null compensation and suspension control for branch handlers.

``BranchBarrier`` holds the identity of one branch call (trans_type, gid, branch_id, op) and hands
out barrier ids ``01``, ``02``, ... for each protected local transaction inside that call
(protocol.md §7). The storage backends build on it.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional

from ._consts import MSG, MSG_BRANCH_ID, OP_ACTION, OP_CANCEL, OP_COMPENSATE, OP_MSG, OP_ROLLBACK, OP_TRY
from ._validate import check_branch_id, check_gid
from .errors import DtmInvalidInput

__all__ = ["BranchBarrier", "ORIGIN_OP"]

# The op a compensating op undoes: its row is inserted first to detect null compensation.
ORIGIN_OP: Mapping[str, str] = {OP_CANCEL: OP_TRY, OP_COMPENSATE: OP_ACTION, OP_ROLLBACK: OP_ACTION}

_MAX_OP_LEN = 45


class BranchBarrier:
    """The barrier identity of one branch call; every field must be non-empty."""

    def __init__(self, trans_type: str, gid: str, branch_id: str, op: str) -> None:
        check_gid(gid)
        check_branch_id(branch_id, gid=gid)
        for name, value in (("trans_type", trans_type), ("op", op)):
            if not isinstance(value, str) or not value or len(value) > _MAX_OP_LEN or not value.isidentifier():
                raise DtmInvalidInput(f"barrier {name} must be a short word, not {value!r}", gid=gid)
        self.trans_type = trans_type
        self.gid = gid
        self.branch_id = branch_id
        self.op = op
        self.barrier_id = 0
        self._lock = threading.Lock()

    @classmethod
    def from_query(cls, query: Mapping[str, Any]) -> "BranchBarrier":
        """Build from a callback's query parameters (``trans_type``, ``gid``, ``branch_id``, ``op``)."""
        values = {k: query.get(k) for k in ("trans_type", "gid", "branch_id", "op")}
        missing = [k for k, v in values.items() if not v]
        if missing:
            raise DtmInvalidInput(f"barrier needs {', '.join(missing)} in the request query")
        return cls(str(values["trans_type"]), str(values["gid"]), str(values["branch_id"]), str(values["op"]))

    @classmethod
    def for_msg(cls, gid: str) -> "BranchBarrier":
        """The barrier of a 2-phase message's local transaction (branch ``00``, op ``msg``)."""
        return cls(MSG, gid, MSG_BRANCH_ID, OP_MSG)

    def next_barrier_id(self) -> str:
        """The next zero-padded barrier id (``01``, ``02``, ...)."""
        with self._lock:
            self.barrier_id += 1
            return f"{self.barrier_id:02d}"

    @property
    def origin_op(self) -> Optional[str]:
        """The op this op compensates (``try`` for ``cancel``, ``action`` for ``compensate``/``rollback``)."""
        return ORIGIN_OP.get(self.op)

    def __repr__(self) -> str:
        return f"BranchBarrier({self.trans_type!r}, {self.gid!r}, {self.branch_id!r}, {self.op!r})"
