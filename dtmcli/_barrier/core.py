"""The storage-independent part of the sub-transaction barrier (protocol.md §7).

The decision of a barrier call depends only on the op and on how many rows (or documents, or keys)
the two insert-if-absent steps created; :func:`decide` is that decision, shared by the SQL and
MongoDB backends. The Redis backend runs the same rules inside one Lua script.
"""

from __future__ import annotations

import enum
import re
from importlib import resources
from typing import Mapping, Optional

from .._consts import OP_ACTION, OP_CANCEL, OP_COMPENSATE, OP_MSG, OP_ROLLBACK, OP_TRY
from ..errors import BarrierConflict, BarrierDatabaseError, DtmInvalidInput

__all__ = [
    "BarrierConflict",
    "BarrierDatabaseError",
    "DEFAULT_TABLE",
    "Decision",
    "MSG_BARRIER_ID",
    "ORIGIN_OP",
    "REASON_ROLLBACK",
    "decide",
    "load_resource",
    "split_table",
    "validate_table",
]

# The op a compensating op undoes: its row is inserted first to detect null compensation.
ORIGIN_OP: Mapping[str, str] = {OP_CANCEL: OP_TRY, OP_COMPENSATE: OP_ACTION, OP_ROLLBACK: OP_ACTION}

DEFAULT_TABLE = "dtm_barrier.barrier"
MSG_BARRIER_ID = "01"
REASON_ROLLBACK = "rollback"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_TABLE_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})?")


class Decision(enum.Enum):
    """What a barrier call does after its insert-if-absent steps."""

    RUN = "run"
    """First delivery: run the business function in the same transaction."""
    NULL_COMPENSATION = "null_compensation"
    """A compensation whose forward op never ran: commit the marker, skip the business function."""
    DUPLICATE = "duplicate"
    """A repeated or suspended (dangling) call: commit, skip the business function."""
    MSG_DUPLICATED = "msg_duplicated"
    """The msg local transaction already committed or was rolled back: roll back, raise DtmDuplicated."""

    @property
    def commits(self) -> bool:
        """Whether the local transaction commits when nothing else goes wrong."""
        return self is not Decision.MSG_DUPLICATED


def decide(op: str, origin_affected: int, current_affected: int) -> Decision:
    """The barrier decision from the op and the rows created by the origin-op and current-op inserts.

    ``origin_affected`` is 0 when the op has no origin op (nothing was inserted).
    """
    if op == OP_MSG and current_affected == 0:
        return Decision.MSG_DUPLICATED
    if op in ORIGIN_OP and origin_affected > 0:
        return Decision.NULL_COMPENSATION
    if current_affected == 0:
        return Decision.DUPLICATE
    return Decision.RUN


def validate_table(table: str) -> str:
    """Return ``table`` if it is ``name`` or ``schema.name`` made of plain identifiers."""
    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        raise DtmInvalidInput(f"barrier table name {table!r} must be an identifier or schema.identifier")
    return table


def split_table(table: str) -> tuple[Optional[str], str]:
    """``(schema, name)`` of a validated table name; schema is ``None`` when unqualified."""
    validate_table(table)
    if "." in table:
        schema, name = table.split(".", 1)
        return schema, name
    return None, table


def load_resource(name: str) -> str:
    """The text of a file shipped in ``dtmcli/sql/``."""
    return resources.files("dtmcli").joinpath("sql").joinpath(name).read_text(encoding="utf-8")


def origin_op(op: str) -> str:
    """The origin op of ``op``, or ``""`` when it has none."""
    return ORIGIN_OP.get(op, "")
