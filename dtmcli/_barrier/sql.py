"""SQL barrier backend: MySQL/MariaDB and PostgreSQL through DB-API, SQLAlchemy or Django.

The algorithm is :func:`~dtmcli._barrier.core.run_barrier`; this module is its SQL adapter
(``_SqlStore``), the DDL templates' filler, and :func:`barrier_preflight`, the table check the
barrier runs once per (database, table). Connections, dialects and error mapping live in
:mod:`dtmcli._barrier.sql_conn` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable, Optional, TypeVar

from .._consts import MSG_BRANCH_ID, OP_MSG
from ..errors import DtmError
from .core import (
    DEFAULT_TABLE,
    MSG_BARRIER_ID,
    REASON_ROLLBACK,
    BarrierConflict,
    BarrierDatabaseError,
    BarrierIdentity,
    Decision,
    load_resource,
    run_barrier,
    settle_prepared,
    split_table,
    validate_table,
)
from .sql_conn import (
    DIALECTS,
    MARIADB,
    MYSQL,
    POSTGRES,
    _Adapter,
    _DbApiAdapter,
    _DjangoAdapter,
    _is_db_exception,
    _SqlAlchemyAdapter,
    _text,
    adapt,
    connection_charset,
    connection_from,
    detect_dialect,
    is_connection_error,
    is_retryable,
    map_db_error,
    normalize_dialect,
    require_utf8mb4,
)

__all__ = [
    "DIALECTS",
    "MARIADB",
    "MYSQL",
    "POSTGRES",
    "Finding",
    "SqlBarrierIdentity",
    "adapt",
    "barrier_call",
    "barrier_preflight",
    "connection_from",
    "create_schema",
    "ddl",
    "detect_dialect",
    "insert_barrier",
    "is_connection_error",
    "is_retryable",
    "map_db_error",
    "mysql_migration",
    "normalize_dialect",
    "query_prepared",
]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")

_COLUMNS = "(trans_type, gid, branch_id, op, barrier_id, reason)"


SqlBarrierIdentity = BarrierIdentity  # the name older code imports


# --- dialects and statements -----------------------------------------------------------------


def _insert_sql(dialect: str, table: str) -> str:
    values = "values(%s, %s, %s, %s, %s, %s)"
    if dialect == MYSQL:
        return f"insert ignore into {table}{_COLUMNS} {values}"
    # The conflict target names the unique key's columns rather than the constraint: identical for
    # the standard table (constraint uniq_barrier on these columns), and it also works for a
    # custom table next to it, whose constraint cannot share the name uniq_barrier in one schema.
    return f"insert into {table}{_COLUMNS} {values} on conflict (gid, branch_id, op, barrier_id) do nothing"


def _select_reason_sql(table: str) -> str:
    return f"select reason from {table} where gid = %s and branch_id = %s and op = %s and barrier_id = %s"


def _fill(template: str, schema: Optional[str], name: str) -> str:
    """Fill a DDL template's ``{schema}``/``{table}``; without a schema, drop the lines creating one."""
    if schema is None:
        lines = [line for line in template.splitlines() if "{schema}" not in line.replace("{schema}.", "")]
        template = "\n".join(lines).replace("{schema}.", "") + "\n"
    return template.replace("{schema}", schema or "").replace("{table}", name)


# The binary, NO PAD collation of the MySQL key columns: MySQL 8 and MariaDB name it differently.
KEY_COLLATION = {MYSQL: "utf8mb4_0900_bin", MARIADB: "utf8mb4_nopad_bin"}


def _flavour(dialect: str) -> str:
    """``mariadb`` for that spelling, else the normalized dialect."""
    name = normalize_dialect(dialect)
    return MARIADB if name == MYSQL and str(dialect).lower() == MARIADB else name


def ddl(dialect: str, table: str = DEFAULT_TABLE) -> str:
    """The barrier DDL for ``dialect`` (``mysql`` = MySQL 8, ``mariadb``, ``postgres``, ``mongo``), naming ``table``.

    ``table`` is ``name`` or ``schema.name`` (for Mongo ``database.collection``, default database
    ``dtm_barrier``); both parts are validated identifiers, so the text is safe to execute.
    """
    schema, name = split_table(table)
    if str(dialect).lower() in ("mongo", "mongodb"):
        return _fill(load_resource("barrier.mongo.js"), schema or "dtm_barrier", name)
    flavour = _flavour(dialect)
    text = load_resource(f"barrier.{normalize_dialect(dialect)}.sql")
    return _fill(text, schema, name).replace("{collation}", KEY_COLLATION.get(flavour, ""))


def ddl_statements(dialect: str, table: str = DEFAULT_TABLE) -> list[str]:
    """The DDL of :func:`ddl` split into single statements (comments removed)."""
    body = "\n".join(line for line in ddl(dialect, table).splitlines() if not line.lstrip().startswith("--"))
    return [stmt.strip() for stmt in body.split(";") if stmt.strip()]


# --- the table check (collation) -----------------------------------------------------------------

_KEY_LENGTHS = {"gid": 128, "branch_id": 128, "op": 45, "barrier_id": 45}
_checked: set[tuple[str, ...]] = set()
_checked_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem :func:`barrier_preflight` found with a barrier table (``dtmcli doctor`` reports these)."""

    code: str
    """``missing_table``, ``missing_column``, ``missing_unique_key``, ``case_insensitive`` (or
    accent-insensitive, or PostgreSQL citext), ``pad_space`` (or PostgreSQL char(n)), ``narrow_charset``
    (key columns not in utf8mb4) or ``connection_charset`` (the connection itself is not utf8mb4)."""
    table: str
    message: str
    fix: str = ""


def mysql_migration(table: str = DEFAULT_TABLE, flavour: str = MYSQL) -> str:
    """The one statement giving an existing MySQL (``mysql``) or MariaDB (``mariadb``) barrier table binary keys."""
    validate_table(table)
    return f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE {KEY_COLLATION[_flavour(flavour)]};"


def _mysql_column_problems(data_type: str, charset: Optional[str], collation: Optional[str]) -> list[str]:
    """``narrow_charset`` / ``case_insensitive`` / ``pad_space`` when the column merges distinct ids."""
    if data_type.lower() in ("binary", "varbinary") or collation in (None, "binary"):
        return []
    # A character the column's set cannot hold is stored as '?' (INSERT IGNORE only warns).
    problems = ["narrow_charset"] if (charset or "").lower() != "utf8mb4" else []
    name = collation.lower()
    if "_nopad_bin" in name or name.endswith("_0900_bin"):
        return problems
    if name.endswith("_bin"):
        return [*problems, "pad_space"]  # byte order, but 'x' and 'x ' compare equal
    return [*problems, "case_insensitive"]


def _check_mysql(adapter: _Adapter, table: str) -> list[Finding]:
    schema, name = split_table(table)
    # One round trip: the last column says whether a unique key covers exactly the four key columns
    # (a prefix index does not count: long ids sharing the prefix would collide).
    sql = (
        "select column_name, data_type, character_set_name, collation_name, version(), exists(select 1 from "
        "information_schema.statistics where table_schema = coalesce(%s, database()) and table_name = %s and "
        "non_unique = 0 group by index_name having count(*) = 4 and group_concat(if(sub_part is null, "
        "lower(column_name), '') order by lower(column_name)) = 'barrier_id,branch_id,gid,op') "
        "from information_schema.columns where table_schema = coalesce(%s, database()) and table_name = %s "
        "and column_name in ('gid', 'branch_id', 'op', 'barrier_id')"
    )
    rows = adapter.fetch_all(sql, (schema, name, schema, name))
    if not rows:
        return [Finding("missing_table", table, f"barrier table {table} does not exist (or lacks its key columns)",
                        "create it with dtmcli.barrier.create_schema(conn, table=...) or "
                        "`python -m dtmcli.sql ddl mysql`")]
    flavour = MARIADB if "mariadb" in _text(rows[0][4]).lower() else MYSQL
    findings = _key_findings(table, flavour, {_text(r[0]) for r in rows}, bool(rows[0][5]))
    problems: dict[str, list[str]] = {}
    for column, data_type, charset, collation, _version, _unique in rows:
        column, data_type = _text(column), _text(data_type)
        charset = _text(charset) if charset is not None else None
        collation = _text(collation) if collation is not None else None
        for kind in _mysql_column_problems(data_type, charset, collation):
            problems.setdefault(kind, []).append(f"{column} ({charset if kind == 'narrow_charset' else collation})")
    fix = f"convert the key columns to utf8mb4 and binary: {mysql_migration(table, flavour)}"
    if "narrow_charset" in problems:
        findings.append(Finding(
            "narrow_charset", table,
            f"barrier table {table} stores {', '.join(problems['narrow_charset'])} in a character set other "
            "than utf8mb4: a character it cannot hold is stored as '?', so gids differing only in such "
            "characters share barrier rows and the second transaction's business effect is skipped as a "
            "duplicate", fix,
        ))
    if "case_insensitive" in problems:
        findings.append(Finding(
            "case_insensitive", table,
            f"barrier table {table} compares {', '.join(problems['case_insensitive'])} case- or "
            "accent-insensitively: gids such as 'Order-x' and 'order-x' share barrier rows, so the second "
            "transaction's business effect is skipped as a duplicate", fix,
        ))
    if "pad_space" in problems:
        findings.append(Finding(
            "pad_space", table,
            f"barrier table {table} compares {', '.join(problems['pad_space'])} with a PAD SPACE collation: "
            "gids 'x' and 'x ' share barrier rows", fix,
        ))
    return findings


def _check_postgres(adapter: _Adapter, table: str) -> list[Finding]:
    # One round trip; the last column: a unique index usable by ON CONFLICT (no expression, no
    # predicate, not deferred) on exactly the four key columns.
    sql = (
        "select a.attname, c.collname, c.collisdeterministic, t.typname, exists(select 1 from pg_index i "
        "where i.indrelid = to_regclass(%s) and i.indisunique and i.indimmediate and i.indpred is null "
        "and i.indexprs is null and (select array_agg(k.attname::text order by k.attname::text) from "
        "unnest(i.indkey) n(num) left join pg_attribute k on k.attrelid = i.indrelid and k.attnum = n.num) "
        "= array['barrier_id', 'branch_id', 'gid', 'op']) from pg_attribute a "
        "join pg_type t on t.oid = a.atttypid left join pg_collation c on c.oid = a.attcollation "
        "where a.attrelid = to_regclass(%s) and a.attnum > 0 and not a.attisdropped "
        "and a.attname in ('gid', 'branch_id', 'op', 'barrier_id')"
    )
    rows = adapter.fetch_all(sql, (table, table))
    if not rows:
        return [Finding("missing_table", table, f"barrier table {table} does not exist (or lacks its key columns)",
                        "create it with dtmcli.barrier.create_schema(conn, table=...) or "
                        "`python -m dtmcli.sql ddl postgres`")]
    findings = _key_findings(table, "postgres", {_text(r[0]) for r in rows}, bool(rows[0][4]))
    loose = [(_text(col), _text(coll)) for col, coll, deterministic, _t, _u in rows if deterministic is False]
    citext = [_text(col) for col, _c, _d, typ, _u in rows if _text(typ) == "citext"]
    padded = [_text(col) for col, _c, _d, typ, _u in rows if _text(typ) == "bpchar"]

    def retype(columns: list[str]) -> str:
        return f"ALTER TABLE {table} " + ", ".join(
            f'ALTER COLUMN {col} TYPE varchar({_KEY_LENGTHS[col]}) COLLATE "C"' for col in columns
        ) + ";"

    if loose:
        findings.append(Finding(
            "case_insensitive", table,
            f"barrier table {table} compares {', '.join(f'{c} ({k})' for c, k in loose)} with a nondeterministic "
            "collation: distinct gids can share barrier rows", retype([c for c, _ in loose]),
        ))
    if citext:
        findings.append(Finding(
            "case_insensitive", table,
            f"barrier table {table} stores {', '.join(citext)} as citext, which compares case-insensitively: "
            "gids such as 'Order-x' and 'order-x' share barrier rows", retype(citext),
        ))
    if padded:
        findings.append(Finding(
            "pad_space", table,
            f"barrier table {table} stores {', '.join(padded)} as char(n), which ignores trailing spaces: "
            "gids 'x' and 'x ' share barrier rows", retype(padded),
        ))
    return findings


def _key_findings(table: str, dialect: str, present: set[str], unique: bool) -> list[Finding]:
    """``missing_column`` / ``missing_unique_key``: without a unique key on exactly the four key columns,
    a repeated branch call is not recognised as a duplicate and its business effect runs twice."""
    keys = list(_KEY_LENGTHS)
    new_table = f"recreate it from `python -m dtmcli.sql ddl {dialect} --table {table}`"
    missing = [k for k in keys if k not in present]
    if missing:
        return [Finding("missing_column", table, f"barrier table {table} lacks the key column(s) "
                        f"{', '.join(missing)}", new_table)]
    if unique:
        return []
    return [Finding(
        "missing_unique_key", table,
        f"barrier table {table} has no unique key on exactly (gid, branch_id, op, barrier_id): duplicate or "
        "late branch calls are not detected, so business effects can run twice or after a rollback",
        f"ALTER TABLE {table} ADD UNIQUE (gid, branch_id, op, barrier_id); or {new_table}",
    )]


def barrier_preflight(conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None) -> list[Finding]:
    """Check the barrier table behind ``conn`` (read-only): missing, or comparing ids loosely.

    Returns the problems found, ``[]`` when the table is fine. ``conn`` is anything
    :func:`connection_from` accepts. The barrier runs the table part once per (database, table) on
    first use and logs each finding as a WARNING; a MySQL connection whose character set is not
    utf8mb4 (finding ``connection_charset``) it refuses on every call.
    """
    validate_table(table)
    with connection_from(conn) as c:
        adapter = adapt(c, dialect)
        was_open = isinstance(adapter, _DbApiAdapter) and adapter._in_transaction()
        try:
            findings = _check(adapter, table)
            charset = connection_charset(adapter) if adapter.dialect == MYSQL else "utf8mb4"
            if charset != "utf8mb4":
                findings.append(Finding(
                    "connection_charset", table,
                    f"the connection's character set is {charset!r}, not utf8mb4: the "
                    "barrier refuses it, as ids with characters it cannot hold would share barrier rows",
                    "connect with charset utf8mb4 (e.g. pymysql.connect(..., charset='utf8mb4'))",
                ))
            return findings
        finally:
            if not was_open:
                _end_read(adapter)


def _check(adapter: _Adapter, table: str) -> list[Finding]:
    return _check_mysql(adapter, table) if adapter.dialect == MYSQL else _check_postgres(adapter, table)


def _end_read(adapter: _Adapter) -> None:
    """Close the transaction a read may have opened on a DB-API connection (not the caller's)."""
    if isinstance(adapter, _DbApiAdapter) and adapter._in_transaction():
        adapter.conn.rollback()


def _target(adapter: _Adapter) -> tuple[str, ...]:
    """Which database a connection talks to, for the once-per-target table check."""
    conn = adapter.conn
    if isinstance(adapter, _SqlAlchemyAdapter):
        bind = conn.get_bind() if hasattr(conn, "get_bind") else conn
        return ("sqlalchemy", repr(bind.engine.url))
    if isinstance(adapter, _DjangoAdapter):
        return ("django", str(conn.alias))
    info = getattr(conn, "info", None)
    if info is not None and hasattr(info, "dbname"):  # psycopg2 >= 2.8, psycopg 3
        return (adapter.driver, str(info.host), str(info.port), str(info.dbname))
    return (adapter.driver, str(getattr(conn, "host", "")), str(getattr(conn, "port", "")),
            _text(getattr(conn, "db", "") or ""))


def _check_once(adapter: _Adapter, table: str) -> None:
    """Run the table check the first time this (database, table) is used; log findings as WARNINGs.

    Runs inside the barrier's transaction (reads only), so it adds no round trip after the first call.
    """
    key = (*_target(adapter), table)
    if key in _checked:
        return
    with _checked_lock:
        if key in _checked:
            return
        _checked.add(key)
    try:
        findings = _check(adapter, table)
    except Exception as exc:  # never block the barrier on the check; say so once
        logger.warning("barrier table check of %s skipped: %s", table, exc)
        if adapter.dialect == POSTGRES:
            raise  # the failed read aborted the transaction: this call fails (retryable), the next runs
        return
    for finding in findings:
        if finding.code != "missing_table":  # the insert reports a missing table itself
            logger.warning("%s; fix: %s", finding.message, finding.fix)


# --- the algorithm ----------------------------------------------------------------------------


def _rollback_quietly(adapter: _Adapter, what: str) -> None:
    """Roll back after a failure; a failing rollback is logged, the original error is what matters."""
    try:
        adapter.rollback()
    except Exception as rb_exc:  # the connection may be gone
        logger.warning("%s: rollback failed too: %s", what, rb_exc)


def _begin(adapter: _Adapter, where: dict[str, Any]) -> None:
    """Open the barrier's transaction, then refuse a connection that cannot hold every id (MySQL: utf8mb4)."""
    adapter.begin()
    try:
        require_utf8mb4(adapter, where)
    except Exception:
        _rollback_quietly(adapter, f"barrier {where.get('gid')}/{where.get('branch_id')}/{where.get('op')}")
        raise


def insert_barrier(
    adapter: _Adapter, table: str, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str, reason: str
) -> int:
    """INSERT-IGNORE one barrier row; the number of rows inserted (0 or 1)."""
    return adapter.execute(_insert_sql(adapter.dialect, table), (trans_type, gid, branch_id, op, barrier_id, reason))


class _SqlStore:
    """The SQL adapter of :func:`~dtmcli._barrier.core.run_barrier`: one local transaction on ``conn``."""

    def __init__(self, conn: Any, adapter: _Adapter, table: str, barrier: BarrierIdentity) -> None:
        self.tx = conn
        self.adapter = adapter
        self.table = table
        self.barrier = barrier

    def begin(self) -> None:
        b = self.barrier
        _begin(self.adapter, {"gid": b.gid, "branch_id": b.branch_id, "op": b.op})
        try:
            _check_once(self.adapter, self.table)
        except Exception as exc:
            self.rollback(exc)
            raise

    def insert_if_absent(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                         reason: str) -> int:
        return insert_barrier(self.adapter, self.table, trans_type, gid, branch_id, op, barrier_id, reason)

    def commit(self) -> None:
        self.adapter.commit()

    def rollback(self, cause: BaseException) -> None:
        b = self.barrier
        _rollback_quietly(self.adapter, f"barrier {b.gid}/{b.branch_id}/{b.op} after {type(cause).__name__}")

    def map_error(self, exc: BaseException, what: str) -> DtmError:
        return map_db_error(exc, what, self.barrier)

    def busi_error(self, exc: Exception) -> Optional[DtmError]:
        # A lost connection or a lock conflict in the business SQL is retryable like the barrier's own.
        if _is_db_exception(exc) and (is_retryable(exc) or is_connection_error(exc)):
            return map_db_error(exc, "business call", self.barrier)
        return None


def barrier_call(
    conn: Any,
    barrier: BarrierIdentity,
    busi: Callable[[Any], R],
    *,
    table: str = DEFAULT_TABLE,
    dialect: Optional[str] = None,
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Optional[R]:
    """Run ``busi(conn)`` under the barrier in one local transaction (protocol.md §7).

    Returns ``busi``'s result, or ``None`` when the call was a duplicate, suspended or a null
    compensation (committed without running ``busi``). Raises DtmDuplicated for a repeated msg,
    BarrierConflict on lock conflicts, BarrierDatabaseError on database failures, and whatever
    ``busi`` raised otherwise (after rolling the barrier rows back with it).
    """
    validate_table(table)
    return run_barrier(_SqlStore(conn, adapt(conn, dialect), table, barrier), barrier, busi, on_decision)


def query_prepared(
    conn: Any, trans_type: str, gid: str, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None
) -> None:
    """The msg ``query_prepared`` check (protocol.md §7): return on success, raise DtmFailure on rollback.

    ``conn`` is anything :func:`connection_from` accepts. Inserts the ``rollback`` marker for
    (gid, 00, msg, 01) unless the local transaction already inserted its row, then reads which one won.
    """
    validate_table(table)
    with connection_from(conn) as c:
        adapter = adapt(c, dialect)
        where = {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}
        try:
            _begin(adapter, where)
            insert_barrier(adapter, table, trans_type, gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID, REASON_ROLLBACK)
            row = adapter.fetch_one(_select_reason_sql(table), (gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID))
            adapter.commit()
        except DtmError:
            raise
        except Exception as exc:
            _rollback_quietly(adapter, f"query_prepared {gid}")
            if is_retryable(exc):
                raise BarrierConflict(f"query_prepared: lock conflict, retry later: {exc}", **where) from exc
            raise BarrierDatabaseError(f"query_prepared failed: {type(exc).__name__}: {exc}", **where) from exc
    settle_prepared(_text(row[0]) if row else None, gid)


def create_schema(conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None) -> None:
    """Create the barrier schema/database and table if they do not exist (idempotent).

    On MySQL the server's version picks the key collation (MySQL 8 or MariaDB). An existing table is
    left as it is: :func:`barrier_preflight` reports one whose keys compare case-insensitively.
    """
    validate_table(table)
    adapter = adapt(conn, dialect)
    try:
        adapter.begin()
        flavour = adapter.dialect
        if flavour == MYSQL:
            row = adapter.fetch_one("select version()", ())
            flavour = MARIADB if row and "mariadb" in _text(row[0]).lower() else MYSQL
        for stmt in ddl_statements(flavour, table):
            adapter.execute(stmt, ())
        adapter.commit()
    except DtmError:
        raise
    except Exception as exc:
        _rollback_quietly(adapter, "create_schema")
        raise BarrierDatabaseError(f"creating the barrier schema failed: {exc}") from exc
