"""Typed views of what DTM's ``/query`` and ``/all`` return (pure parsing)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["Branch", "Transaction", "TransactionPage"]


def _s(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    return value if isinstance(value, str) else ""


def _opt(raw: Mapping[str, Any], key: str) -> Optional[str]:
    value = raw.get(key)
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Branch:
    """One branch row: ``(branch_id, op)`` is unique within a transaction."""

    gid: str
    branch_id: str
    op: str
    status: str
    url: str
    data: bytes
    create_time: Optional[str] = None
    update_time: Optional[str] = None
    finish_time: Optional[str] = None
    rollback_time: Optional[str] = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Branch:
        """Parse one element of ``/query``'s ``branches``."""
        try:
            data = base64.b64decode(_s(raw, "bin_data"), validate=True)
        except (binascii.Error, ValueError):
            data = b""
        return cls(
            gid=_s(raw, "gid"),
            branch_id=_s(raw, "branch_id"),
            op=_s(raw, "op"),
            status=_s(raw, "status"),
            url=_s(raw, "url"),
            data=data,
            create_time=_opt(raw, "create_time"),
            update_time=_opt(raw, "update_time"),
            finish_time=_opt(raw, "finish_time"),
            rollback_time=_opt(raw, "rollback_time"),
            raw=dict(raw),
        )


@dataclass(frozen=True)
class Transaction:
    """A global transaction as DTM stores it, with its branches when it came from ``query``."""

    gid: str
    trans_type: str
    status: str
    protocol: str = ""
    rollback_reason: str = ""
    result: str = ""
    query_prepared: str = ""
    custom_data: str = ""
    steps: tuple[Mapping[str, str], ...] = ()
    payloads: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    create_time: Optional[str] = None
    update_time: Optional[str] = None
    finish_time: Optional[str] = None
    rollback_time: Optional[str] = None
    next_cron_interval: Optional[int] = None
    next_cron_time: Optional[str] = None
    branches: tuple[Branch, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_final(self) -> bool:
        """True once the status is ``succeed`` or ``failed``."""
        return self.status in ("succeed", "failed")

    def branch(self, branch_id: str, op: str) -> Optional[Branch]:
        """The branch row with this id and op, if any."""
        for b in self.branches:
            if b.branch_id == branch_id and b.op == op:
                return b
        return None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], branches: Any = ()) -> Transaction:
        """Parse a ``transaction`` object (and the ``branches`` list) from ``/query`` or ``/all``."""
        try:
            options = json.loads(_s(raw, "options") or "{}")
        except ValueError:
            options = {}
        steps = raw.get("steps") if isinstance(raw.get("steps"), list) else []
        payloads = raw.get("payloads") if isinstance(raw.get("payloads"), list) else []
        interval = raw.get("next_cron_interval")
        return cls(
            gid=_s(raw, "gid"),
            trans_type=_s(raw, "trans_type"),
            status=_s(raw, "status"),
            protocol=_s(raw, "protocol"),
            rollback_reason=_s(raw, "rollback_reason"),
            result=_s(raw, "result"),
            query_prepared=_s(raw, "query_prepared"),
            custom_data=_s(raw, "custom_data"),
            steps=tuple(s for s in steps or () if isinstance(s, dict)),
            payloads=tuple(p for p in payloads or () if isinstance(p, str)),
            options=options if isinstance(options, dict) else {},
            create_time=_opt(raw, "create_time"),
            update_time=_opt(raw, "update_time"),
            finish_time=_opt(raw, "finish_time"),
            rollback_time=_opt(raw, "rollback_time"),
            next_cron_interval=interval if isinstance(interval, int) else None,
            next_cron_time=_opt(raw, "next_cron_time"),
            branches=tuple(Branch.from_json(b) for b in branches or () if isinstance(b, dict)),
            raw=dict(raw),
        )


@dataclass(frozen=True)
class TransactionPage:
    """One page of ``/all``; pass ``next_position`` back for the next page (``""`` at the end)."""

    transactions: tuple[Transaction, ...]
    next_position: str
