"""The branch side of XA (protocol.md §9): the local XA transaction and the phase-2 handler.

MySQL/MariaDB use ``XA START/END/PREPARE/COMMIT/ROLLBACK``; PostgreSQL uses ``BEGIN`` and
``PREPARE TRANSACTION`` / ``COMMIT PREPARED`` / ``ROLLBACK PREPARED``. The xid is
``<gid>-<branch_id>``; both parts are validated as ``[A-Za-z0-9_-]`` so the quoted xid cannot
carry SQL, and its length is checked against the server's limit.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from .._consts import OP_ACTION, OP_COMMIT, OP_ROLLBACK, XA
from .._validate import check_branch_id, check_gid
from ..errors import BarrierConflict, DtmError, DtmFailure, DtmInvalidInput
from .core import DEFAULT_TABLE, BarrierDatabaseError, validate_table
from .sql import insert_barrier
from .sql_conn import (
    MYSQL,
    POSTGRES,
    _DbApiAdapter,
    _driver_error,
    _error_code,
    adapt,
    connection_from,
    is_connection_error,
    map_db_error,
)

if TYPE_CHECKING:
    from ..branch import BranchInfo
    from ..client import DtmLike

__all__ = ["XA_BARRIER_ID", "xa_handle_phase2", "xa_local_transaction", "xa_preflight", "xid_of"]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")

XA_BARRIER_ID = "01"
_MAX_XID = {MYSQL: 64, POSTGRES: 199}  # MySQL gtrid: 64 bytes; PostgreSQL GID: < 200 bytes
# "No such transaction" from XA COMMIT/ROLLBACK (MySQL errno 1397 XAER_NOTA) and COMMIT/ROLLBACK
# PREPARED (SQLSTATE 42704 undefined_object): recognised by code, since the message text follows the
# server's language (lc_messages).
_UNKNOWN_XID_CODES = frozenset({1397, "42704"})


def xid_of(gid: str, branch_id: str, dialect: str) -> str:
    """The XA transaction id ``<gid>-<branch_id>``, validated for ``dialect``."""
    check_gid(gid)
    check_branch_id(branch_id, gid=gid)
    xid = f"{gid}-{branch_id}"
    limit = _MAX_XID[dialect]
    if len(xid.encode()) > limit:
        raise DtmInvalidInput(
            f"xa xid {xid!r} is {len(xid)} bytes; {dialect} allows at most {limit}: use a shorter gid",
            gid=gid, branch_id=branch_id,
        )
    return xid


def _info(query: Any) -> BranchInfo:
    from ..branch import BranchInfo

    return query if isinstance(query, BranchInfo) else BranchInfo.from_request(query)


def _dbapi(conn: Any, dialect: Optional[str]) -> _DbApiAdapter:
    adapter = adapt(conn, dialect)
    if not isinstance(adapter, _DbApiAdapter):
        raise DtmInvalidInput(
            "XA needs a dedicated DB-API connection (PyMySQL, psycopg2 or psycopg), not a "
            f"{type(conn).__module__}.{type(conn).__name__}"
        )
    if adapter._in_transaction():
        raise DtmInvalidInput("the XA connection has an open local transaction; commit or roll it back first")
    return adapter


class _Autocommit:
    """Put a DB-API connection in the autocommit mode XA statements need, and restore it after."""

    def __init__(self, adapter: _DbApiAdapter, on: bool) -> None:
        self.adapter = adapter
        self.on = on
        self.saved: Optional[bool] = None

    def __enter__(self) -> None:
        conn = self.adapter.conn
        if self.adapter.driver == "pymysql":
            self.saved = bool(conn.get_autocommit())
            if self.saved != self.on:
                conn.autocommit(self.on)
        elif self.adapter.driver in ("psycopg2", "psycopg"):
            self.saved = bool(conn.autocommit)
            if self.saved != self.on:
                conn.autocommit = self.on

    def __exit__(self, *exc: object) -> None:
        conn = self.adapter.conn
        if self.saved is None or self.saved == self.on or getattr(conn, "closed", False):
            return
        try:
            if self.adapter.driver == "pymysql":
                conn.autocommit(self.saved)
            else:
                conn.autocommit = self.saved
        except Exception as err:  # the connection broke; the caller sees the original error
            logger.warning("xa: could not restore autocommit=%s: %s", self.saved, err)


def _exec(adapter: _DbApiAdapter, sql: str) -> None:
    cur = adapter.conn.cursor()
    try:
        cur.execute(sql)
    finally:
        cur.close()


def _statements(dialect: str, xid: str) -> dict[str, Optional[str]]:
    q = f"'{xid}'"  # safe: xid_of() allowed only [A-Za-z0-9_-]
    if dialect == MYSQL:
        return {
            "start": f"xa start {q}", "end": f"xa end {q}", "prepare": f"xa prepare {q}",
            "abort": f"xa rollback {q}", OP_COMMIT: f"xa commit {q}", OP_ROLLBACK: f"xa rollback {q}",
        }
    return {
        "start": "begin", "end": None, "prepare": f"prepare transaction {q}",
        "abort": "rollback", OP_COMMIT: f"commit prepared {q}", OP_ROLLBACK: f"rollback prepared {q}",
    }


def xa_local_transaction(
    query: Any,
    conn: Any,
    busi: Callable[[Any], R],
    *,
    dtm: Optional[DtmLike] = None,
    table: str = DEFAULT_TABLE,
    dialect: Optional[str] = None,
) -> R:
    """Run ``busi(conn)`` as the local XA transaction of an xa ``action`` call and prepare it.

    ``query`` is the request's BranchInfo or query mapping (it must carry ``dtm`` and
    ``phase2_url``, or pass ``dtm``). ``conn`` is a zero-argument factory of DB-API connections
    (preferred: the connection is opened for this call and closed afterwards, as the Go client
    does) or a dedicated connection without an open transaction (see
    :func:`~dtmcli._barrier.sql.connection_from`). On MySQL/MariaDB a prepared XA
    transaction stays bound to its session until that session disconnects, so phase 2 from
    another connection finds it only after the connection is closed: close a connection you pass.

    Steps: start, barrier row (xa, gid, branch_id, action, 01), ``busi``, registerBranch with DTM,
    end, prepare — or roll back on any error, which is re-raised. A barrier row already present
    means phase 2 rolled this branch back first: DtmFailure, and ``busi`` does not run.
    """
    with connection_from(conn) as dedicated:
        return _local_transaction(query, dedicated, busi, dtm=dtm, table=table, dialect=dialect)


def _local_transaction(
    query: Any, conn: Any, busi: Callable[[Any], R], *, dtm: Optional[DtmLike], table: str, dialect: Optional[str]
) -> R:
    from ..client import as_client

    info = _info(query)
    if info.trans_type != XA or info.op != OP_ACTION:
        raise DtmInvalidInput(
            f"xa_local_transaction handles an xa action, not a {info.trans_type} {info.op}", gid=info.gid
        )
    dtm_url = dtm or info.require_dtm()
    phase2_url = info.require_phase2_url()
    validate_table(table)
    adapter = _dbapi(conn, dialect)
    xid = xid_of(info.gid, info.branch_id, adapter.dialect)
    sql = _statements(adapter.dialect, xid)
    where = {"gid": info.gid, "branch_id": info.branch_id, "op": info.op}
    started = ended = False
    with _Autocommit(adapter, on=adapter.dialect == POSTGRES):
        try:
            _exec(adapter, str(sql["start"]))
            started = True
            affected = insert_barrier(adapter, table, XA, info.gid, info.branch_id, OP_ACTION, XA_BARRIER_ID, OP_ACTION)
            if affected == 0:
                raise DtmFailure("xa branch was already rolled back (or done): its barrier row exists", **where)
            result = busi(conn)
            as_client(dtm_url).post(
                "registerBranch", {"gid": info.gid, "trans_type": XA, "branch_id": info.branch_id, "url": phase2_url}
            )
            if sql["end"]:
                _exec(adapter, sql["end"])
            ended = True
            _exec(adapter, str(sql["prepare"]))
            logger.debug("xa %s prepared", xid)
            return result
        except BaseException as exc:
            if started:
                _abort_local(adapter, sql, ended, xid)
            if isinstance(exc, Exception) and not isinstance(exc, DtmError) and is_connection_error(exc):
                raise map_db_error(exc, "xa local transaction") from exc
            raise


def _abort_local(adapter: _DbApiAdapter, sql: dict[str, Optional[str]], ended: bool, xid: str) -> None:
    steps = [s for s in ((None if ended else sql["end"]), sql["abort"]) if s]
    for stmt in steps:
        try:
            _exec(adapter, stmt)
        except Exception as err:  # the connection may be gone: the server then rolls the XA back itself
            logger.warning("xa %s: %r during abort failed: %s", xid, stmt, err)


def xa_handle_phase2(
    query: Any, conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None
) -> None:
    """Handle DTM's phase-2 call (``op=commit`` or ``op=rollback``) of an XA branch.

    Commits or rolls back the prepared transaction ``<gid>-<branch_id>``; an unknown xid (already
    done: MySQL errno 1397, PostgreSQL SQLSTATE 42704, whatever the server's message language) is
    not an error, so repeats are harmless. ``conn`` is a connection or a factory, as for
    :func:`xa_local_transaction`. After a rollback the barrier row
    (xa, gid, branch_id, action, 01, reason rollback) is inserted, so a late action cannot run.
    """
    info = _info(query)
    if info.op not in (OP_COMMIT, OP_ROLLBACK):
        raise DtmInvalidInput(f"xa phase 2 is commit or rollback, not {info.op!r}", gid=info.gid)
    validate_table(table)
    with connection_from(conn) as dedicated:
        _phase2(info, dedicated, table=table, dialect=dialect)


def _phase2(info: BranchInfo, conn: Any, *, table: str, dialect: Optional[str]) -> None:
    adapter = _dbapi(conn, dialect)
    xid = xid_of(info.gid, info.branch_id, adapter.dialect)
    stmt = str(_statements(adapter.dialect, xid)[info.op])
    with _Autocommit(adapter, on=True):
        try:
            _exec(adapter, stmt)
        except Exception as exc:
            if not is_unknown_xid(exc):
                raise map_db_error(exc, f"xa {info.op}") from exc
            if info.op == OP_COMMIT and _still_prepared(adapter, xid):
                # MariaDB keeps a prepared XA attached to the session that prepared it until that
                # session disconnects; answering success here would lose the committed work.
                raise BarrierConflict(
                    f"xa {xid} is prepared but held by another session (was the action's connection "
                    "returned to a pool instead of closed?); DTM will retry the commit",
                    gid=info.gid, branch_id=info.branch_id, op=info.op,
                ) from exc
            logger.debug("xa %s: %s found nothing to do (%s)", xid, info.op, exc)
    if info.op == OP_ROLLBACK:
        try:
            adapter.begin()
            insert_barrier(adapter, table, XA, info.gid, info.branch_id, OP_ACTION, XA_BARRIER_ID, OP_ROLLBACK)
            adapter.commit()
        except Exception as exc:
            try:
                adapter.rollback()
            except Exception as rb_exc:
                logger.warning("xa %s: rollback of the barrier insert failed: %s", xid, rb_exc)
            raise map_db_error(exc, "xa rollback marker") from exc


def is_unknown_xid(exc: BaseException) -> bool:
    """Whether ``exc`` is the server saying the XA transaction does not exist (by error code, not text)."""
    err = _driver_error(exc)
    return err is not None and _error_code(err) in _UNKNOWN_XID_CODES


def _still_prepared(adapter: _DbApiAdapter, xid: str) -> bool:
    """Whether ``xid`` is still listed as a prepared transaction on the server."""
    with adapter.conn.cursor() as cur:
        if adapter.dialect == POSTGRES:
            cur.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (xid,))
            return cur.fetchone() is not None
        cur.execute("XA RECOVER")
        rows = cur.fetchall()
    wanted = xid.encode()
    return any((row[3].encode() if isinstance(row[3], str) else bytes(row[3])) == wanted for row in rows)


def xa_preflight(conn: Any, *, dialect: Optional[str] = None) -> None:
    """Check that the server behind ``conn`` can run XA branches; raise BarrierDatabaseError explaining why not.

    PostgreSQL needs ``max_prepared_transactions > 0``; MySQL/MariaDB must let this user run
    ``XA START ... XA PREPARE ... XA ROLLBACK``. The check prepares and rolls back a throw-away
    transaction.
    """
    adapter = _dbapi(conn, dialect)
    probe = f"dtmcli-preflight-{uuid.uuid4().hex[:16]}"
    sql = _statements(adapter.dialect, probe)
    if adapter.dialect == POSTGRES:
        row = adapter.fetch_one("show max_prepared_transactions", ())
        adapter.rollback()
        if row is None or int(row[0]) <= 0:
            raise BarrierDatabaseError(
                "PostgreSQL has max_prepared_transactions = 0, so PREPARE TRANSACTION is disabled: set "
                "max_prepared_transactions (e.g. 20, at least max_connections you expect to hold XA branches) "
                "with ALTER SYSTEM or postgresql.conf and restart the server"
            )
    steps = [sql["start"], sql["end"], sql["prepare"], sql[OP_ROLLBACK]]
    with _Autocommit(adapter, on=adapter.dialect == POSTGRES):
        for stmt in steps:
            if not stmt:
                continue
            try:
                _exec(adapter, stmt)
            except Exception as exc:
                text = str(exc)
                hint = ""
                if adapter.dialect == MYSQL and any(c in text for c in ("1227", "1044", "1142", "denied")):
                    hint = " (the MySQL user lacks a privilege XA needs; grant XA_RECOVER_ADMIN on MySQL 8)"
                elif "max_prepared_transactions" in text:
                    hint = " (set max_prepared_transactions > 0 and restart PostgreSQL)"
                _abort_local(adapter, sql, False, probe)
                raise BarrierDatabaseError(f"XA is not usable on this server: {stmt!r} failed: {text}{hint}") from exc
