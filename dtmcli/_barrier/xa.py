"""The branch side of XA (protocol.md §9): the local XA transaction and the phase-2 handler.

MySQL/MariaDB use ``XA START/END/PREPARE/COMMIT/ROLLBACK``; PostgreSQL uses ``BEGIN`` and
``PREPARE TRANSACTION`` / ``COMMIT PREPARED`` / ``ROLLBACK PREPARED``. The xid is
``<gid>-<branch_id>``; both parts are validated as ``[A-Za-z0-9_-]`` so the quoted xid cannot
carry SQL, and its length is checked against the server's limit.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, TypeVar

from .. import _flow
from .._consts import OP_ACTION, OP_COMMIT, OP_ROLLBACK, XA
from .._flow import Call, Flow, StoreOp, discard_awaitable
from .._validate import check_branch_id, check_gid
from ..errors import BarrierConflict, DtmError, DtmFailure, DtmInvalidInput
from .core import DEFAULT_TABLE, BarrierDatabaseError, validate_table
from .sql import _insert_sql, _select_reason_sql, inserted
from .sql_conn import (
    MYSQL,
    POSTGRES,
    _DbApiAdapter,
    _driver_error,
    _error_code,
    aborted_error,
    adapt,
    connection_from,
    is_async_connection,
    is_connection_error,
    map_db_error,
    refuse_pipeline,
)

if TYPE_CHECKING:
    from ..branch import BranchInfo
    from ..client import DtmLike

__all__ = [
    "XA_BARRIER_ID",
    "action_info",
    "is_unknown_xid",
    "local_transaction_flow",
    "phase2_flow",
    "phase2_info",
    "preflight_flow",
    "xa_handle_phase2",
    "xa_local_transaction",
    "xa_preflight",
    "xid_of",
]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")
V = TypeVar("V")

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


def _statements(dialect: str, xid: str) -> dict[str, Optional[str]]:
    q = f"'{xid}'"  # safe: xid_of() allowed only [A-Za-z0-9_-]
    # "abort_prepared": what else the abort runs once the PREPARE was sent (it may have run on the
    # server: PostgreSQL's plain ROLLBACK cannot touch a prepared transaction; MySQL's XA ROLLBACK can).
    if dialect == MYSQL:
        return {
            "start": f"xa start {q}", "end": f"xa end {q}", "prepare": f"xa prepare {q}",
            "abort": f"xa rollback {q}", "abort_prepared": None,
            OP_COMMIT: f"xa commit {q}", OP_ROLLBACK: f"xa rollback {q}",
        }
    return {
        "start": "begin", "end": None, "prepare": f"prepare transaction {q}",
        "abort": "rollback", "abort_prepared": f"rollback prepared {q}",
        OP_COMMIT: f"commit prepared {q}", OP_ROLLBACK: f"rollback prepared {q}",
    }


# --- checks made before anything runs (both flavours) ------------------------------------------------


def action_info(query: Any, dtm: Any, table: str) -> tuple[BranchInfo, Any]:
    """The BranchInfo of an xa ``action`` call and the DTM to register with (``dtm`` or the query's).

    Raises DtmInvalidInput for another kind of call or a bad table name, BranchRequestError when
    the query lacks (or has an untrusted) ``dtm``, or lacks ``phase2_url``.
    """
    info = _info(query)
    if info.trans_type != XA or info.op != OP_ACTION:
        raise DtmInvalidInput(
            f"xa_local_transaction handles an xa action, not a {info.trans_type} {info.op}", gid=info.gid
        )
    dtm_source = dtm or info.require_dtm()
    info.require_phase2_url()
    validate_table(table)
    return info, dtm_source


def phase2_info(query: Any, table: str) -> BranchInfo:
    """The BranchInfo of DTM's phase-2 call (``op=commit`` or ``op=rollback``); checked, nothing runs."""
    info = _info(query)
    if info.op not in (OP_COMMIT, OP_ROLLBACK):
        raise DtmInvalidInput(f"xa phase 2 is commit or rollback, not {info.op!r}", gid=info.gid)
    validate_table(table)
    return info


# --- the flows: every XA decision, over a connection's effects ---------------------------------------
#
# The store ``io`` a driver gives these flows has: ``set_autocommit(on)`` (returns the setting to
# restore, or None when nothing changed or the driver has no such setting), ``exec(sql)`` (one
# statement without parameters; returns the server's command tag where the driver tells it, else
# None), ``exec_shielded(sql)`` (the same, run to its end even when an asyncio caller is cancelled
# meanwhile: the XA start and the abort), ``refuse_aborted()`` (PostgreSQL: raise when the
# transaction is aborted), ``execute(sql, params)`` (the row count), ``fetch_one`` and
# ``fetch_all(sql, params)``, ``commit()``, ``rollback()``; and ``transport`` (HTTP) or ``grpc_io`` (gRPC)
# for registerBranch.
# The asyncio driver also runs ``set_autocommit`` to its end, so the caller's setting is restored.


def _restore_flow(saved: Optional[bool], xid: str) -> Flow[None]:
    if saved is None:
        return
    try:
        yield StoreOp("set_autocommit", saved)
    except Exception as err:  # the connection broke; the caller sees the original error
        logger.warning("xa %s: could not restore autocommit=%s: %s", xid, saved, err)


def _with_autocommit(on: bool, xid: str, body: Flow[V]) -> Flow[V]:
    """Run ``body`` with the connection's autocommit set to ``on`` (XA statements need their own
    mode), and restore the caller's setting after it, whatever happened."""
    saved = yield StoreOp("set_autocommit", on)
    try:
        result = yield from body
    except GeneratorExit:
        raise
    except BaseException:
        yield from _restore_flow(saved, xid)
        raise
    yield from _restore_flow(saved, xid)
    return result


def _abort_local_flow(
    sql: Mapping[str, Optional[str]], ended: bool, xid: str, prepare_sent: bool = False
) -> Flow[None]:
    """Roll the local XA back: every step runs, even after one failed or the caller was cancelled
    again (the cancellation is re-raised at the end), so no transaction is left open on the connection."""
    steps = [s for s in ((None if ended else sql["end"]), sql["abort"]) if s]
    if prepare_sent and sql["abort_prepared"]:
        steps.append(str(sql["abort_prepared"]))
    interrupted: Optional[BaseException] = None
    for stmt in steps:
        try:
            yield StoreOp("exec_shielded", stmt)
        except GeneratorExit:
            raise
        except Exception as err:  # the connection may be gone: the server then rolls the XA back itself
            if stmt == sql["abort_prepared"] and is_unknown_xid(err):
                logger.debug("xa %s: nothing was prepared", xid)
            else:
                logger.warning("xa %s: %r during abort failed: %s", xid, stmt, err)
        except BaseException as exc:  # cancelled again: the statement itself ran to its end
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def local_transaction_flow(
    info: BranchInfo, dialect: str, table: str, busi: Callable[[Any], Any], tx: Any, register: Flow[Any]
) -> Flow[Any]:
    """The local XA transaction of an xa action (protocol.md §9), as a flow.

    Start, the barrier row (xa, gid, branch_id, action, 01), ``Call(busi, tx)``, on PostgreSQL the
    aborted-transaction check, ``register`` (the registerBranch call), end, prepare (on PostgreSQL its
    command tag must be PREPARE TRANSACTION) — or, on any error, end and roll back (once the prepare
    was sent, also ROLLBACK PREPARED on PostgreSQL), then re-raise (a lost connection as
    BarrierDatabaseError). A barrier row already present means phase 2 rolled this branch back
    first: DtmFailure, and ``busi`` does not run. Raises DtmInvalidInput now (nothing runs) for an
    xid the dialect cannot hold.
    """
    xid = xid_of(info.gid, info.branch_id, dialect)
    return _with_autocommit(dialect == POSTGRES, xid, _action_steps(info, dialect, table, xid, busi, tx, register))


def _action_steps(
    info: BranchInfo, dialect: str, table: str, xid: str, busi: Callable[[Any], Any], tx: Any, register: Flow[Any]
) -> Flow[Any]:
    sql = _statements(dialect, xid)
    where = {"gid": info.gid, "branch_id": info.branch_id, "op": info.op}
    started = ended = prepare_sent = False
    try:
        yield StoreOp("exec_shielded", sql["start"])
        started = True
        row = (XA, info.gid, info.branch_id, OP_ACTION, XA_BARRIER_ID, OP_ACTION)
        affected = yield StoreOp("execute", _insert_sql(dialect, table), row)
        if not inserted(affected, **where):
            raise DtmFailure("xa branch was already rolled back (or done): its barrier row exists", **where)
        result = yield Call(busi, tx)
        if inspect.isasyncgen(result):  # nothing of it ran; preparing would report work never done
            raise DtmInvalidInput(
                "the xa business function returned an async generator, which never runs its body: "
                "use async def (await, return) instead", **where
            )
        if dialect == POSTGRES:
            # An error the business code caught aborted the transaction; PREPARE would then be a quiet
            # ROLLBACK, and the branch would report success for lost work.
            yield StoreOp("refuse_aborted")
        yield from register
        if sql["end"]:
            yield StoreOp("exec", sql["end"])
        ended = prepare_sent = True
        tag = yield StoreOp("exec", sql["prepare"])
        if dialect == POSTGRES and tag is not None and str(tag).upper() != "PREPARE TRANSACTION":
            raise aborted_error()  # belt and braces: the server rolled it back instead (tag ROLLBACK)
        logger.debug("xa %s prepared", xid)
        return result
    except GeneratorExit:
        raise
    except BaseException as exc:
        if started:
            yield from _abort_local_flow(sql, ended, xid, prepare_sent)
        if isinstance(exc, Exception) and not isinstance(exc, DtmError) and is_connection_error(exc):
            raise map_db_error(exc, "xa local transaction") from exc
        raise


def phase2_flow(info: BranchInfo, dialect: str, table: str) -> Flow[None]:
    """DTM's phase-2 call of an XA branch as a flow: commit or roll back ``<gid>-<branch_id>``.

    An unknown xid is "already done" for a rollback. For a commit it is done only when the action's
    barrier row (xa, gid, branch_id, action, 01, reason action), committed with the branch, is there:
    a commit finding the xid still prepared in another session raises BarrierConflict (DTM retries),
    one finding neither raises BarrierDatabaseError, since the branch's work was never prepared or
    was rolled back, and answering success would make DTM report the global transaction succeeded.
    After a rollback the barrier row (xa, gid, branch_id, action, 01, reason rollback) is inserted
    and committed, so a late action cannot run.
    """
    xid = xid_of(info.gid, info.branch_id, dialect)
    return _with_autocommit(True, xid, _phase2_steps(info, dialect, table, xid))


def _phase2_steps(info: BranchInfo, dialect: str, table: str, xid: str) -> Flow[None]:
    stmt = str(_statements(dialect, xid)[info.op])
    try:
        yield StoreOp("exec", stmt)
    except Exception as exc:
        if not is_unknown_xid(exc):
            raise map_db_error(exc, f"xa {info.op}") from exc
        if info.op == OP_COMMIT:
            yield from _committed_before_flow(info, dialect, table, xid, exc)
        logger.debug("xa %s: %s found nothing to do (%s)", xid, info.op, exc)
    if info.op == OP_ROLLBACK:
        row = (XA, info.gid, info.branch_id, OP_ACTION, XA_BARRIER_ID, OP_ROLLBACK)
        try:
            # Autocommitted where the driver allows it; the commit covers the drivers that cannot switch.
            yield StoreOp("execute", _insert_sql(dialect, table), row)
            yield StoreOp("commit")
        except Exception as exc:
            try:
                yield StoreOp("rollback")
            except Exception as rb_exc:
                logger.warning("xa %s: rollback of the barrier insert failed: %s", xid, rb_exc)
            raise map_db_error(exc, "xa rollback marker") from exc


def _committed_before_flow(info: BranchInfo, dialect: str, table: str, xid: str, unknown: Exception) -> Flow[None]:
    """A commit found no transaction ``xid``: return only when an earlier commit did it; raise otherwise."""
    where = {"gid": info.gid, "branch_id": info.branch_id, "op": info.op}
    if (yield from _still_prepared_flow(dialect, xid)):
        # MariaDB keeps a prepared XA attached to the session that prepared it until that
        # session disconnects; answering success here would lose the committed work.
        raise BarrierConflict(
            f"xa {xid} is prepared but held by another session (was the action's connection "
            "returned to a pool instead of closed?); DTM will retry the commit", **where,
        ) from unknown
    try:
        key = (info.gid, info.branch_id, OP_ACTION, XA_BARRIER_ID)
        row = yield StoreOp("fetch_one", _select_reason_sql(table), key)
    except Exception as exc:
        raise map_db_error(exc, "xa commit: barrier row check") from exc
    if row is not None and row[0] == OP_ACTION:
        return  # committed together with the branch: an earlier commit did it
    # The action's row commits with the branch's work: without it, nothing of the branch was
    # committed (never prepared, or rolled back). Success would make DTM mark the global transaction
    # succeeded with this branch's work lost; an error keeps it visible (DTM retries and alerts).
    logger.error(
        "xa %s: commit found no prepared transaction and no committed action barrier row in %s "
        "(reason %r): the branch's work is lost; answering an error so DTM keeps the transaction open",
        xid, table, row[0] if row is not None else None,
    )
    raise BarrierDatabaseError(
        f"xa {xid}: commit found no prepared transaction and no committed action barrier row: the "
        "branch's work was never prepared or was rolled back, and cannot be committed", **where,
    ) from unknown


def is_unknown_xid(exc: BaseException) -> bool:
    """Whether ``exc`` is the server saying the XA transaction does not exist (by error code, not text)."""
    err = _driver_error(exc)
    return err is not None and _error_code(err) in _UNKNOWN_XID_CODES


def _still_prepared_flow(dialect: str, xid: str) -> Flow[bool]:
    """Whether ``xid`` is still listed as a prepared transaction on the server."""
    if dialect == POSTGRES:
        row = yield StoreOp("fetch_one", "SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (xid,))
        return row is not None
    rows = yield StoreOp("fetch_all", "XA RECOVER", ())
    wanted = xid.encode()
    return any((row[3].encode() if isinstance(row[3], str) else bytes(row[3])) == wanted for row in rows)


def preflight_flow(dialect: str) -> Flow[None]:
    """The XA preflight as a flow: PostgreSQL's ``max_prepared_transactions``, then a throw-away
    transaction started, prepared and rolled back; BarrierDatabaseError explains what is missing."""
    probe = f"dtmcli-preflight-{uuid.uuid4().hex[:16]}"
    return _with_autocommit(dialect == POSTGRES, probe, _preflight_steps(dialect, probe))


def _preflight_steps(dialect: str, probe: str) -> Flow[None]:
    sql = _statements(dialect, probe)
    if dialect == POSTGRES:
        row = yield StoreOp("fetch_one", "show max_prepared_transactions", ())
        if row is None or int(row[0]) <= 0:
            raise BarrierDatabaseError(
                "PostgreSQL has max_prepared_transactions = 0, so PREPARE TRANSACTION is disabled: set "
                "max_prepared_transactions (e.g. 20, at least max_connections you expect to hold XA branches) "
                "with ALTER SYSTEM or postgresql.conf and restart the server"
            )
    for stmt in (sql["start"], sql["end"], sql["prepare"], sql[OP_ROLLBACK]):
        if not stmt:
            continue
        try:
            yield StoreOp("exec", stmt)
        except Exception as exc:
            text = str(exc)
            hint = ""
            if dialect == MYSQL and any(c in text for c in ("1227", "1044", "1142", "denied")):
                hint = " (the MySQL user lacks a privilege XA needs; grant XA_RECOVER_ADMIN on MySQL 8)"
            elif "max_prepared_transactions" in text:
                hint = " (set max_prepared_transactions > 0 and restart PostgreSQL)"
            yield from _abort_local_flow(sql, False, probe)
            raise BarrierDatabaseError(f"XA is not usable on this server: {stmt!r} failed: {text}{hint}") from exc


# --- the blocking driver ---------------------------------------------------------------------------


def _dbapi(conn: Any, dialect: Optional[str]) -> _DbApiAdapter:
    if is_async_connection(conn):
        raise DtmInvalidInput(
            f"{type(conn).__module__}.{type(conn).__name__} is an asyncio connection: use "
            "dtmcli.asyncio.xa_local_transaction / xa_handle_phase2 / xa_preflight (awaited)"
        )
    adapter = adapt(conn, dialect)
    if not isinstance(adapter, _DbApiAdapter):
        raise DtmInvalidInput(
            "XA needs a dedicated DB-API connection (PyMySQL, psycopg2 or psycopg), not a "
            f"{type(conn).__module__}.{type(conn).__name__}"
        )
    if adapter.driver == "psycopg":
        refuse_pipeline(conn)
    if adapter._in_transaction():
        raise DtmInvalidInput("the XA connection has an open local transaction; commit or roll it back first")
    return adapter


class _XaIO:
    """The blocking I/O of the XA flows: one DB-API connection, and the DTM client's ``transport``
    (HTTP Request effects) or ``grpc_io`` (the DtmCall effects of a gRPC client's registerBranch)."""

    def __init__(self, adapter: _DbApiAdapter, transport: Any = None, grpc_io: Any = None) -> None:
        self.adapter = adapter
        self.conn = adapter.conn
        self.transport = transport
        self.grpc_io = grpc_io

    def set_autocommit(self, on: bool) -> Optional[bool]:
        conn, driver = self.conn, self.adapter.driver
        if getattr(conn, "closed", False):
            return None
        if driver == "pymysql":
            current = bool(conn.get_autocommit())
        elif driver in ("psycopg2", "psycopg"):
            current = bool(conn.autocommit)
        else:
            return None
        if current == on:
            return None
        if driver == "pymysql":
            conn.autocommit(on)
        else:
            conn.autocommit = on
        return current

    def exec(self, sql: str) -> Optional[str]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql)
            tag = getattr(cur, "statusmessage", None)  # psycopg2 / psycopg: the command tag
            return tag if isinstance(tag, str) else None
        finally:
            cur.close()

    exec_shielded = exec  # nothing to shield from in blocking code

    def refuse_aborted(self) -> None:
        self.adapter.refuse_aborted()

    def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return self.adapter.execute(sql, params)

    def fetch_one(self, sql: str, params: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
        return self.adapter.fetch_one(sql, params)

    def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self.adapter.fetch_all(sql, params)

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


def _blocking(busi: Callable[[Any], R]) -> Callable[[Any], R]:
    def call(tx: Any) -> R:
        result = busi(tx)
        if discard_awaitable(result):  # it would be prepared without having run
            raise DtmInvalidInput(
                "the business function returned an awaitable: the blocking xa_local_transaction cannot await "
                "it; use dtmcli.asyncio.xa_local_transaction for async def business functions"
            )
        return result

    return call


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
    ``busi`` must be a plain function (an awaitable it returns is refused, and rolled back). On
    PostgreSQL a database error ``busi`` caught aborts the whole transaction, whose PREPARE would
    quietly roll it back: that is refused before registering (BarrierDatabaseError), as is a
    PREPARE the server answers with ROLLBACK; let such errors propagate, or use a savepoint.
    """
    from ..client import as_client

    return _local_transaction(query, conn, busi, dtm=dtm, table=table, dialect=dialect, as_dtm=as_client)


def _local_transaction(
    query: Any,
    conn: Any,
    busi: Callable[[Any], R],
    *,
    dtm: Any,
    table: str,
    dialect: Optional[str],
    as_dtm: Callable[[Any], Any],
) -> R:
    """:func:`xa_local_transaction` registering through the client ``as_dtm`` makes of the DTM source:
    an HTTP one, or a gRPC one (:func:`dtmcli.grpc.xa_local_transaction`). The call (xa action, phase2_url,
    trusted dtm, table) is checked before a connection is opened; the xid's length, which needs the dialect, right
    after, before anything is sent."""
    from ..xa import register_xa_branch_flow, xa_registration

    info, dtm_source = action_info(query, dtm, table)
    client = as_dtm(dtm_source)
    register = register_xa_branch_flow(client, xa_registration(info))
    with connection_from(conn) as dedicated:
        adapter = _dbapi(dedicated, dialect)
        flow = local_transaction_flow(info, adapter.dialect, table, _blocking(busi), dedicated, register)
        result: R = _flow.run(flow, _XaIO(adapter, client.transport, getattr(client, "grpc_io", None)))
        return result


def xa_handle_phase2(
    query: Any, conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None
) -> None:
    """Handle DTM's phase-2 call (``op=commit`` or ``op=rollback``) of an XA branch.

    Commits or rolls back the prepared transaction ``<gid>-<branch_id>``; an unknown xid (MySQL
    errno 1397, PostgreSQL SQLSTATE 42704, whatever the server's message language) means already
    done, so repeats are harmless. For a commit that holds only when the action's barrier row
    (xa, gid, branch_id, action, 01, reason action), committed with the branch's work as
    :func:`xa_local_transaction` writes it, is there; without it the branch's work was never
    prepared or was rolled back, and BarrierDatabaseError is raised (answered 500: DTM keeps
    retrying and alerting, instead of marking the global transaction succeeded). ``conn`` is a
    connection or a factory, as for :func:`xa_local_transaction`. After a rollback the barrier row
    (xa, gid, branch_id, action, 01, reason rollback) is inserted, so a late action cannot run.
    """
    info = phase2_info(query, table)
    with connection_from(conn) as dedicated:
        adapter = _dbapi(dedicated, dialect)
        _flow.run(phase2_flow(info, adapter.dialect, table), _XaIO(adapter))


def xa_preflight(conn: Any, *, dialect: Optional[str] = None) -> None:
    """Check that the server behind ``conn`` can run XA branches; raise BarrierDatabaseError explaining why not.

    PostgreSQL needs ``max_prepared_transactions > 0``; MySQL/MariaDB must let this user run
    ``XA START ... XA PREPARE ... XA ROLLBACK``. The check prepares and rolls back a throw-away
    transaction.
    """
    adapter = _dbapi(conn, dialect)
    _flow.run(preflight_flow(adapter.dialect), _XaIO(adapter))
