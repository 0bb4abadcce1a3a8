"""Transaction records and where they live: in memory, or in memory backed by a SQLite file."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

__all__ = ["BranchRecord", "TransRecord", "Options", "MemoryStore", "SqliteStore", "Store"]


@dataclass
class Options:
    """The options DTM stores with a transaction (``TransOptions``)."""

    wait_result: bool = False
    timeout_to_fail: int = 0
    retry_interval: int = 0
    request_timeout: int = 0
    retry_limit: int = 0
    branch_headers: dict[str, str] = field(default_factory=dict)
    concurrent: bool = False

    def to_json_text(self) -> str:
        """The ``options`` column: Go's field order, zero values left out except ``concurrent``."""
        out: dict[str, Any] = {}
        if self.wait_result:
            out["wait_result"] = True
        if self.timeout_to_fail:
            out["timeout_to_fail"] = self.timeout_to_fail
        if self.retry_interval:
            out["retry_interval"] = self.retry_interval
        if self.branch_headers:
            out["branch_headers"] = dict(sorted(self.branch_headers.items()))
        out["concurrent"] = self.concurrent
        if self.retry_limit:
            out["retry_limit"] = self.retry_limit
        if self.request_timeout:
            out["request_timeout"] = self.request_timeout
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)

    def copy(self) -> Options:
        """An independent copy."""
        return Options(**{**asdict(self), "branch_headers": dict(self.branch_headers)})


@dataclass
class BranchRecord:
    """One branch row; ``(branch_id, op)`` is unique within its transaction."""

    gid: str
    branch_id: str
    op: str
    url: str
    data: str
    status: str = "prepared"
    create_time: Optional[float] = None
    update_time: Optional[float] = None
    finish_time: Optional[float] = None
    rollback_time: Optional[float] = None


@dataclass
class TransRecord:
    """A global transaction with its branches, in registration order."""

    gid: str
    trans_type: str
    status: str
    steps: list[dict[str, str]] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)
    custom_data: str = ""
    query_prepared: str = ""
    protocol: str = "http"
    rollback_reason: str = ""
    result: str = ""
    options: Options = field(default_factory=Options)
    create_time: float = 0.0
    update_time: float = 0.0
    finish_time: Optional[float] = None
    rollback_time: Optional[float] = None
    next_cron_interval: int = 0
    next_cron_time: float = 0.0
    retry_count: int = 0
    seq: int = 0
    submit_built: bool = False
    """workflow: the row is the object built from the submit body (boltdb), so /query omits what it lacked."""
    branches: list[BranchRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for persistence)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TransRecord:
        """The inverse of :meth:`to_dict`."""
        raw = dict(raw)
        raw["options"] = Options(**raw.get("options") or {})
        raw["branches"] = [BranchRecord(**b) for b in raw.get("branches") or []]
        return cls(**raw)


class MemoryStore:
    """Transactions kept in a dict; the engine serialises access with its own lock."""

    def __init__(self) -> None:
        self._trans: dict[str, TransRecord] = {}
        self._seq = 0
        self._lock = threading.Lock()

    def get(self, gid: str) -> Optional[TransRecord]:
        """The record for ``gid`` or ``None``."""
        return self._trans.get(gid)

    def add(self, rec: TransRecord) -> bool:
        """Store a new record; False when the gid exists already."""
        with self._lock:
            if rec.gid in self._trans:
                return False
            self._seq += 1
            rec.seq = self._seq
            self._trans[rec.gid] = rec
        self.save(rec)
        return True

    def save(self, rec: TransRecord) -> None:
        """Persist the current state of ``rec`` (no-op in memory)."""

    def records(self) -> Iterator[TransRecord]:
        """Every record, oldest first."""
        return iter(list(self._trans.values()))

    def close(self) -> None:
        """Release resources."""


class SqliteStore(MemoryStore):
    """The memory store, written through to a SQLite file so a restart resumes unfinished work."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db_lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS dtm_trans (gid TEXT PRIMARY KEY, seq INTEGER NOT NULL, body TEXT NOT NULL)"
        )
        for (body,) in self._db.execute("SELECT body FROM dtm_trans ORDER BY seq"):
            rec = TransRecord.from_dict(json.loads(body))
            self._trans[rec.gid] = rec
            self._seq = max(self._seq, rec.seq)

    def save(self, rec: TransRecord) -> None:
        """Write the whole record (small: a test tool, not a production store)."""
        body = json.dumps(rec.to_dict(), separators=(",", ":"))
        with self._db_lock:
            self._db.execute(
                "INSERT INTO dtm_trans (gid, seq, body) VALUES (?, ?, ?) "
                "ON CONFLICT(gid) DO UPDATE SET body = excluded.body",
                (rec.gid, rec.seq, body),
            )

    def close(self) -> None:
        """Close the database file."""
        with self._db_lock:
            self._db.close()


Store = MemoryStore
