"""Pure rendering and parsing for the command line: tables, JSON shapes, ``--since`` durations."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable, Optional, Sequence

from .._models import Branch, Transaction

__all__ = ["branch_key", "changes", "clean", "list_table", "parse_since", "table", "to_json", "transaction_json",
           "transaction_text"]

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``15m``, ``1h``, ``2d``, ``1w`` (a bare number is seconds).

    Raises ValueError for anything else, or a duration that is not positive.
    """
    m = _SINCE.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h, 2d, 1w)")
    seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"duration too long: {text!r}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, not {text!r}")
    return seconds


def clean(text: str) -> str:
    """``text`` with every unprintable character (escape sequences, newlines) as a space: what DTM sent
    must neither fake output lines nor steer the terminal."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _cell(value: Optional[str]) -> str:
    return clean(value or "-")


def table(headers: Sequence[str], rows: Iterable[Sequence[Optional[str]]]) -> str:
    """A left-aligned plain-text table, columns two spaces apart; ``None``/empty cells show ``-``."""
    cells = [list(headers), *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in cells)


def transaction_text(trans: Transaction) -> str:
    """``dtmcli query``: the transaction's fields, then its branches as a table."""
    fields = [
        ("gid", trans.gid),
        ("type", trans.trans_type),
        ("status", trans.status),
        ("created", trans.create_time),
        ("updated", trans.update_time),
        ("finished", trans.finish_time),
        ("rolled back", trans.rollback_time),
        ("rollback reason", trans.rollback_reason),
        ("next cron time", None if trans.is_final else trans.next_cron_time),
    ]
    shown = [(k, v) for k, v in fields if v or k in ("gid", "type", "status")]
    width = max(len(k) for k, _ in shown)
    out = "".join(f"{k + ':':<{width + 1}} {_cell(v)}\n" for k, v in shown)
    if not trans.branches:
        return out + "\n(no branches)\n"
    rows = [(b.branch_id, b.op, b.status, b.url, b.create_time, b.finish_time or b.rollback_time or b.update_time)
            for b in trans.branches]
    return out + "\n" + table(("BRANCH", "OP", "STATUS", "URL", "CREATED", "FINISHED/UPDATED"), rows)


def list_table(transactions: Sequence[Transaction]) -> str:
    """``dtmcli list``: one row per transaction."""
    rows = [(t.gid, t.trans_type, t.status, t.create_time, t.update_time, t.rollback_reason) for t in transactions]
    return table(("GID", "TYPE", "STATUS", "CREATED", "UPDATED", "ROLLBACK REASON"), rows)


def transaction_json(trans: Transaction) -> dict[str, Any]:
    """The ``/query`` shape: ``{"transaction": {...}, "branches": [...]}`` as DTM sent it."""
    return {"transaction": dict(trans.raw), "branches": [dict(b.raw) for b in trans.branches]}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """One line of strict JSON (for ``--json``), newline-terminated: ASCII only (a lone surrogate from
    DTM is escaped, not an encoding error), NaN and infinities as ``null``."""
    try:
        text = json.dumps(value, ensure_ascii=True, sort_keys=True, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(value), ensure_ascii=True, sort_keys=True, allow_nan=False)
    return text + "\n"


def branch_key(b: Branch) -> tuple[str, str]:
    """A branch row's identity within its transaction."""
    return (b.branch_id, b.op)


def changes(before: Optional[Transaction], after: Transaction) -> list[str]:
    """``dtmcli watch``: one line per thing that changed from ``before`` to ``after`` (everything when None)."""
    lines = []
    if before is None or before.status != after.status:
        reason = f" ({_cell(after.rollback_reason)})" if after.rollback_reason and after.status != "succeed" else ""
        lines.append(f"transaction {_cell(after.gid)}: {_cell(after.status)}{reason}")
    old = {branch_key(b): b.status for b in before.branches} if before is not None else {}
    for b in after.branches:
        if old.get(branch_key(b)) != b.status:
            lines.append(f"  branch {_cell(b.branch_id)} {_cell(b.op)}: {_cell(b.status)}  {_cell(b.url)}")
    return lines
