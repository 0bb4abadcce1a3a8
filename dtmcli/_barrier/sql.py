"""SQL barrier backend: MySQL/MariaDB and PostgreSQL through DB-API, SQLAlchemy or Django.

The algorithm is :func:`~dtmcli._barrier.core.barrier_flow`; this module is its SQL store: the
statements and the steps (begin with its checks, quiet rollback) as flows over an adapter, shared by
the blocking ``_SqlStore`` here and the asyncio store (``dtmcli/asyncio/_barrier_sql.py``), which
differ only in how they drive them. Also the DDL templates' filler and :func:`barrier_preflight`, the
table check the barrier runs once per (database, table). Connections, dialects and error mapping
live in :mod:`dtmcli._barrier.sql_conn` (re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import re
import threading
import weakref
from typing import Any, Callable, Mapping, Optional, TypeVar

from .. import _flow
from .._consts import MSG_BRANCH_ID, OP_MSG
from .._flow import Flow, StoreOp
from ..errors import DtmError
from .core import (
    DEFAULT_TABLE,
    BarrierDatabaseError,
    BarrierIdentity,
    Decision,
    load_resource,
    prepared_flow,
    run_barrier,
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
    _driver_error,
    _error_code,
    _is_db_exception,
    _map_db_error,
    _text,
    adapt,
    claimed,
    connection_charset,
    connection_from,
    detect_dialect,
    is_connection_error,
    is_retryable,
    map_db_error,
    mariadb_version,
    normalize_dialect,
    require_utf8mb4_flow,
    rolled_back_error,
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


def _insert_pair_sql(dialect: str, table: str, with_id: bool = False) -> str:
    """Both rows of an op with an origin op in one statement, answering the ``op`` of each row it inserted.

    PostgreSQL: ``ON CONFLICT DO NOTHING RETURNING``; MariaDB >= 10.5: ``INSERT IGNORE ... RETURNING``
    (both return only the rows really inserted). The rows are the ones the two single inserts make,
    in the same order. ``with_id`` (MariaDB, a table with an ``id`` column): ``returning id, op``,
    the id of the row this call created, for the row check at commit.
    """
    values = "values(%s, %s, %s, %s, %s, %s), (%s, %s, %s, %s, %s, %s)"
    if dialect == MYSQL:
        return f"insert ignore into {table}{_COLUMNS} {values} returning {'id, ' if with_id else ''}op"
    conflict = "on conflict (gid, branch_id, op, barrier_id) do nothing"
    return f"insert into {table}{_COLUMNS} {values} {conflict} returning op"


# MariaDB: the barrier row check and the COMMIT in one statement (an anonymous compound statement).
# SIGNAL leaves the transaction open for the barrier to roll back; the message is how it is recognised.
_ROW_GONE = "dtmcli: barrier row gone"
_SIGNAL_ERRNO = 1644  # ER_SIGNAL_EXCEPTION: SQLSTATE '45000' raised by SIGNAL
_PARSE_ERRNO = 1064


def _row_where(by_id: bool) -> str:
    """The barrier row of this call: by the id its INSERT created and its key, or (a table without
    an ``id`` column) by its key alone, which a concurrent duplicate delivery's row also matches."""
    key = "gid = %s and branch_id = %s and op = %s and barrier_id = %s"
    return f"id = %s and {key}" if by_id else key


def _checked_commit_sql(table: str, by_id: bool = False, restore: str = "") -> str:
    """MariaDB: refuse (SIGNAL) unless the barrier row of this call is there, else COMMIT, then ``restore``
    (the statement putting the caller's autocommit mode back), in one statement and one round trip."""
    tail = f" {restore};" if restore else ""
    return (
        f"begin not atomic if not exists(select 1 from {table} where {_row_where(by_id)}) then signal sqlstate "
        f"'45000' set message_text = '{_ROW_GONE}'; end if; commit;{tail} end"
    )


# Driver connections on which the server refused the compound statement: they keep the separate
# check. The version gate already keeps it from servers that cannot parse it (MySQL, MariaDB
# < 10.1; sql_mode=ORACLE parses it too), so this is for a handshake whose version is not the real
# server's (a proxy's configured version string). Weak: an entry dies with its connection.
_no_compound: weakref.WeakSet[Any] = weakref.WeakSet()
# The same for INSERT IGNORE ... RETURNING (MariaDB >= 10.5): these connections get two single inserts.
_no_returning: weakref.WeakSet[Any] = weakref.WeakSet()


def _refused(refused: weakref.WeakSet[Any], raw: Any) -> bool:
    try:
        return raw in refused
    except TypeError:  # the connection cannot be weakly referenced
        return False

# Whether a barrier table has an auto-increment ``id`` column (the standard DDL and Go's have one),
# learnt by the once-per-(database, table) check. Keyed by the adapter's target and the validated
# table name; a fact about a table, so it stays true in a forked child. Not known (the check has not
# run yet in this process, or failed): the row check at commit uses the key alone, as before.
_row_id_tables: dict[tuple[str, ...], bool] = {}


def inserted(affected: int, **where: Any) -> bool:
    """Whether a single-row INSERT IGNORE / ON CONFLICT DO NOTHING created its row (1) or found it (0).

    Any other count (a driver that cannot tell: psycopg 3 in pipeline mode answers -1) raises
    BarrierDatabaseError: taken for a new row, it would run a duplicate or a late call again.
    """
    if affected not in (0, 1):
        raise BarrierDatabaseError(f"the barrier INSERT answered {affected} rows changed, not 0 or 1: cannot tell "
                                   "whether the row was new", **where)
    return affected == 1


def _returned_ops(rows: list[tuple[Any, ...]], origin: str, op: str) -> tuple[int, int]:
    """``(origin_affected, current_affected)`` from the ops an insert_pair returned, compared exactly in Python.

    The op is each row's last column (``returning op`` or ``returning id, op``). The table's
    collation plays no part; only trailing spaces are dropped (a char(n) column pads, and no op
    name ends with a space). Anything else returned is a table that does not store what the barrier
    wrote: an error rather than a guess.
    """
    seen = {_text(row[-1]).rstrip(" ") for row in rows}
    if not seen <= {origin, op} or len(rows) != len(seen):
        raise BarrierDatabaseError(f"barrier insert returned unexpected ops {sorted(seen)!r} for {origin!r}/{op!r}")
    return int(origin in seen), int(op in seen)


def _select_reason_sql(table: str, by_id: bool = False) -> str:
    return f"select reason from {table} where {_row_where(by_id)}"


_PLACEHOLDER = re.compile(r"%s")


def numbered(sql: str) -> str:
    """``sql`` with its ``%s`` placeholders numbered ``$1``, ``$2`` ... (asyncpg), from the one template."""
    count = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _m: f"${next(count)}", sql)


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


def _check_mysql(adapter: Any, table: str) -> Flow[list[Finding]]:
    schema, name = split_table(table)
    # One round trip: the last column says whether a unique key covers exactly the four key columns
    # (a prefix index does not count: long ids sharing the prefix would collide).
    sql = (
        "select column_name, data_type, character_set_name, collation_name, version(), exists(select 1 from "
        "information_schema.statistics where table_schema = coalesce(%s, database()) and table_name = %s and "
        "non_unique = 0 group by index_name having count(*) = 4 and group_concat(if(sub_part is null, "
        "lower(column_name), '') order by lower(column_name)) = 'barrier_id,branch_id,gid,op'), "
        "exists(select 1 from information_schema.columns where table_schema = coalesce(%s, database()) and "
        "table_name = %s and column_name = 'id' and locate('auto_increment', extra) > 0) "
        "from information_schema.columns where table_schema = coalesce(%s, database()) and table_name = %s "
        "and column_name in ('gid', 'branch_id', 'op', 'barrier_id')"
    )
    rows = yield StoreOp("fetch_all", sql, (schema, name, schema, name, schema, name))
    if not rows:
        return [Finding("missing_table", table, f"barrier table {table} does not exist (or lacks its key columns)",
                        "create it with dtmcli.barrier.create_schema(conn, table=...) or "
                        "`python -m dtmcli.sql ddl mysql`")]
    flavour = MARIADB if "mariadb" in _text(rows[0][4]).lower() else MYSQL
    key = (*adapter.target(), table)
    _row_id_tables[key] = bool(rows[0][6])
    findings = _key_findings(table, flavour, {_text(r[0]) for r in rows}, bool(rows[0][5]))
    problems: dict[str, list[str]] = {}
    for column, data_type, charset, collation, _version, _unique, _id in rows:
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


def _check_postgres(adapter: Any, table: str) -> Flow[list[Finding]]:
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
    rows = yield StoreOp("fetch_all", sql, (table, table))
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
        adapter = adapt(c, dialect, atomic=False)
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
    return _flow.run(_check_flow(adapter, table), adapter)


def _check_flow(adapter: Any, table: str) -> Flow[list[Finding]]:
    """The table check as a flow: one ``fetch_all`` of the catalog, then the findings."""
    return _check_mysql(adapter, table) if adapter.dialect == MYSQL else _check_postgres(adapter, table)


def _end_read(adapter: _Adapter) -> None:
    """Close the transaction a read may have opened on a DB-API connection (not the caller's)."""
    if isinstance(adapter, _DbApiAdapter) and adapter._in_transaction():
        adapter.conn.rollback()


def _check_once_flow(adapter: Any, table: str) -> Flow[None]:
    """Run the table check the first time this (database, table) is used; log findings as WARNINGs.

    Runs inside the barrier's transaction (reads only), so it adds no round trip after the first call.
    """
    key = (*adapter.target(), table)
    if key in _checked:
        return
    with _checked_lock:
        if key in _checked:
            return
        _checked.add(key)
    try:
        findings = yield from _check_flow(adapter, table)
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
    _flow.run(rollback_quietly_flow(what), adapter)


def rollback_quietly_flow(what: str) -> Flow[None]:
    """:func:`_rollback_quietly` as a flow: one ``rollback``; its failure is logged, never raised."""
    try:
        yield StoreOp("rollback")
    except Exception as rb_exc:  # the connection may be gone
        logger.warning("%s: rollback failed too: %s", what, rb_exc)


def insert_barrier(
    adapter: _Adapter, table: str, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str, reason: str
) -> int:
    """INSERT-IGNORE one barrier row; the number of rows inserted (0 or 1)."""
    return adapter.execute(_insert_sql(adapter.dialect, table), (trans_type, gid, branch_id, op, barrier_id, reason))


class SqlStoreBase:
    """The SQL store of the barrier flows, minus the driving: one local transaction on ``conn``.

    Everything decided here is shared by the blocking store (:class:`_SqlStore`) and the asyncio one:
    the statements (one template each; asyncpg numbers the placeholders) and the steps as flows over
    the adapter. ``where`` (gid, branch_id, op) labels errors and logs.
    """

    def __init__(self, conn: Any, adapter: Any, table: str, where: Mapping[str, Any]) -> None:
        self.tx = conn
        self.adapter = adapter
        self.table = table
        self.where = dict(where)
        self._required_row: Optional[tuple[tuple[Any, ...], bool]] = None
        self._row_ids: dict[tuple[str, str, str, str], int] = {}

    def _label(self, cause: Optional[BaseException] = None) -> str:
        w = self.where
        label = f"barrier {w.get('gid')}/{w.get('branch_id')}/{w.get('op')}"
        return f"{label} after {type(cause).__name__}" if cause is not None else label

    def begin_flow(self) -> Flow[None]:
        """Open the transaction, then refuse a connection that cannot hold every id (MySQL: utf8mb4)
        and run the once-per-table check; a refusal rolls back before it is raised."""
        yield StoreOp("begin")
        try:
            yield from require_utf8mb4_flow(self.adapter, self.where)
            yield from _check_once_flow(self.adapter, self.table)
        except GeneratorExit:
            raise
        except BaseException:
            yield from rollback_quietly_flow(self._label())
            raise

    def insert_statement(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                         reason: str) -> tuple[str, tuple[str, ...]]:
        """The INSERT-IGNORE of one barrier row and its parameters."""
        return _insert_sql(self.adapter.dialect, self.table), (trans_type, gid, branch_id, op, barrier_id, reason)

    @property
    def combined_insert(self) -> bool:
        """Whether both rows of an op with an origin op go in one statement (:func:`_insert_pair_sql`):
        PostgreSQL, and MariaDB from 10.5 (told by the server's handshake); MySQL has no RETURNING."""
        if self.adapter.dialect == POSTGRES:
            return True
        raw = self.adapter.dbapi_connection()
        version = mariadb_version(raw)
        return version is not None and version >= (10, 5) and not _refused(_no_returning, raw)

    def insert_pair_flow(self, trans_type: str, gid: str, branch_id: str, origin: str, op: str, barrier_id: str,
                         reason: str) -> Flow[tuple[int, int]]:
        """Insert the origin op's and the op's rows in one statement; ``(origin_affected, current_affected)``."""
        params = (trans_type, gid, branch_id, origin, barrier_id, reason, trans_type, gid, branch_id, op, barrier_id,
                  reason)
        with_id = self._table_has_id()
        try:
            rows = yield StoreOp("fetch_all", _insert_pair_sql(self.adapter.dialect, self.table, with_id), params)
        except Exception as exc:
            if not self._parse_error(exc, _no_returning, "INSERT ... RETURNING"):
                raise
            # MySQL: a statement the server could not parse did nothing, and the transaction goes on.
            origin_affected = yield from self._insert_one_flow(*params[:6])
            current_affected = yield from self._insert_one_flow(*params[6:])
            return origin_affected, current_affected
        affected = _returned_ops(rows, origin, op)  # a refusal is labelled by the flow's error mapping
        if with_id:
            for row in rows:
                if _text(row[-1]).rstrip(" ") == op:
                    self._note_row_id((gid, branch_id, op, barrier_id), row[0])
        return affected

    def _insert_one_flow(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                         reason: str) -> Flow[int]:
        """One single-row INSERT IGNORE as a flow (the fallback of :meth:`insert_pair_flow`)."""
        affected = yield StoreOp("execute", *self.insert_statement(trans_type, gid, branch_id, op, barrier_id, reason))
        self.note_insert((gid, branch_id, op, barrier_id), int(affected))
        return int(affected)

    def _parse_error(self, exc: BaseException, refused: weakref.WeakSet[Any], what: str) -> bool:
        """Whether ``exc`` is MySQL's parse error (1064) of a MariaDB-only statement; if so the connection
        is remembered in ``refused`` (it keeps the portable statements from then on) and a WARNING says so:
        a server whose handshake claims a MariaDB version it does not parse (a proxy's version string)."""
        err = _driver_error(exc)
        if self.adapter.dialect != MYSQL or err is None or _error_code(err) != _PARSE_ERRNO:
            return False
        logger.warning("the server refused the barrier's %s although its handshake says MariaDB %s (%s); using "
                       "the portable statements on this connection from now on", what,
                       mariadb_version(self.adapter.dbapi_connection()), exc)
        with contextlib.suppress(TypeError):
            refused.add(self.adapter.dbapi_connection())
        return True

    def _table_has_id(self) -> bool:
        """MySQL: whether the table check found an auto-increment ``id`` column (``False`` while unknown)."""
        if self.adapter.dialect != MYSQL:
            return False
        return _row_id_tables.get((*self.adapter.target(), self.table), False)

    def note_insert(self, key: tuple[str, str, str, str], affected: int) -> None:
        """After a single-row INSERT: refuse a row count other than 0 or 1 (:func:`inserted`); remember the id
        of the row it created (MySQL ``lastrowid``, read from the answer to the INSERT itself), for the row
        check at commit."""
        if inserted(affected) and self._table_has_id():
            self._note_row_id(key, getattr(self.adapter, "last_id", None))

    def _note_row_id(self, key: tuple[str, str, str, str], value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            self._row_ids[key] = value

    def _compound_commit(self) -> bool:
        """MariaDB on a plain driver connection: the row check can ride on the COMMIT (:func:`_checked_commit_sql`)."""
        if not getattr(self.adapter, "owns_commit", False) or self.adapter.dialect != MYSQL:
            return False
        raw = self.adapter.dbapi_connection()
        version = mariadb_version(raw)
        return version is not None and version >= (10, 1) and not _refused(_no_compound, raw)

    def reason_statement(self, gid: str, branch_id: str, op: str, barrier_id: str) -> tuple[str, tuple[str, ...]]:
        """The SELECT of one barrier row's reason and its parameters."""
        return _select_reason_sql(self.table), (gid, branch_id, op, barrier_id)

    def reason_flow(self, gid: str, branch_id: str, op: str, barrier_id: str) -> Flow[Optional[str]]:
        """The reason stored for one barrier key, ``None`` when there is no row."""
        row = yield StoreOp("fetch_one", *self.reason_statement(gid, branch_id, op, barrier_id))
        return _text(row[0]) if row else None

    def rollback_flow(self, cause: BaseException) -> Flow[None]:
        """Roll back after ``cause``; a failing rollback is logged, never raised."""
        return rollback_quietly_flow(self._label(cause))

    @property
    def recheck_row(self) -> bool:
        """MySQL: re-read the op's row before COMMIT (MariaDB: within the COMMIT's statement). InnoDB
        answers a deadlock (and a lock wait timeout under innodb_rollback_on_timeout) by rolling back the
        whole transaction, barrier rows included; business code that catches the error goes on in a new
        transaction (never in autocommit: the barrier turns autocommit off for the call). PostgreSQL aborts
        instead: every later statement fails until the ROLLBACK, and the aborted transaction is refused
        before COMMIT without a round trip."""
        return bool(self.adapter.dialect == MYSQL)

    def require_row_flow(self, gid: str, branch_id: str, op: str, barrier_id: str) -> Flow[None]:
        """Raise :func:`~dtmcli._barrier.sql_conn.rolled_back_error` unless the barrier row is still there.

        The row is the one this call's INSERT created, by its id (``returning id, op`` on MariaDB >= 10.5,
        else the INSERT's ``lastrowid``, both read from the INSERT's own answer) and key: after a rollback
        under the business code, a concurrent duplicate delivery of the same op may have inserted a row with
        the same key meanwhile, and that row must not pass for ours. A table without an auto-increment ``id``
        column (or before the once-per-table check has told) is checked by key alone: weaker, as before.
        On MariaDB over a plain driver connection the check is deferred into the commit
        (:meth:`commit_flow`): the same read, in the same transaction, sent with the COMMIT.
        """
        key = (gid, branch_id, op, barrier_id)
        row_id = self._row_ids.get(key)
        row = ((row_id, *key), True) if row_id is not None else (key, False)
        if self._compound_commit():
            self._required_row = row
            return
        yield from self._require_flow(*row)

    def _require_flow(self, params: tuple[Any, ...], by_id: bool) -> Flow[None]:
        """The separate row check: the row this call inserted (by id and key), or its key alone."""
        found = yield StoreOp("fetch_one", _select_reason_sql(self.table, by_id), params)
        if found is None:
            raise rolled_back_error(self.where)

    def commit_flow(self) -> Flow[None]:
        """COMMIT; with a deferred row check, one statement that refuses (rolled_back_error) unless the
        row is there and commits otherwise. A server refusing that statement's syntax gets the separate
        check and a plain COMMIT, on this call and every later one on this connection."""
        row, self._required_row = self._required_row, None
        if row is None:
            yield StoreOp("commit")
            return
        params, by_id = row
        sql = _checked_commit_sql(self.table, by_id, getattr(self.adapter, "restore_sql", ""))
        try:
            yield StoreOp("commit_by", sql, params)
            return
        except Exception as exc:
            err = _driver_error(exc)
            code = _error_code(err) if err is not None else None
            if code == _SIGNAL_ERRNO and _ROW_GONE in str(exc):
                raise rolled_back_error(self.where) from exc
            if not self._parse_error(exc, _no_compound, "checked COMMIT"):
                raise
        yield from self._require_flow(params, by_id)
        yield StoreOp("commit")

    def map_error(self, exc: BaseException, what: str) -> DtmError:
        return _map_db_error(exc, what, self.where)

    def busi_error(self, exc: Exception) -> Optional[DtmError]:
        # A lost connection or a lock conflict in the business SQL is retryable like the barrier's own.
        if _is_db_exception(exc) and (is_retryable(exc) or is_connection_error(exc)):
            return _map_db_error(exc, "business call", self.where)
        return None


class _SqlStore(SqlStoreBase):
    """The blocking SQL store of :func:`~dtmcli._barrier.core.run_barrier`."""

    def begin(self) -> None:
        _flow.run(self.begin_flow(), self.adapter)

    def insert_if_absent(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                         reason: str) -> int:
        affected = int(self.adapter.execute(*self.insert_statement(trans_type, gid, branch_id, op, barrier_id,
                                                                   reason)))
        self.note_insert((gid, branch_id, op, barrier_id), affected)
        return affected

    def read_reason(self, gid: str, branch_id: str, op: str, barrier_id: str) -> Optional[str]:
        return _flow.run(self.reason_flow(gid, branch_id, op, barrier_id), self.adapter)

    def insert_pair(self, trans_type: str, gid: str, branch_id: str, origin: str, op: str, barrier_id: str,
                    reason: str) -> tuple[int, int]:
        return _flow.run(self.insert_pair_flow(trans_type, gid, branch_id, origin, op, barrier_id, reason),
                         self.adapter)

    def require_row(self, gid: str, branch_id: str, op: str, barrier_id: str) -> None:
        _flow.run(self.require_row_flow(gid, branch_id, op, barrier_id), self.adapter)

    def commit(self) -> None:
        _flow.run(self.commit_flow(), self.adapter)

    def rollback(self, cause: BaseException) -> None:
        _flow.run(self.rollback_flow(cause), self.adapter)


def _where(barrier: BarrierIdentity) -> dict[str, Any]:
    return {"gid": barrier.gid, "branch_id": barrier.branch_id, "op": barrier.op}


def msg_where(gid: str) -> dict[str, Any]:
    """The error labels of the msg ``query_prepared`` check of ``gid``."""
    return {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}


def barrier_call(
    conn: Any,
    barrier: BarrierIdentity,
    busi: Callable[[Any], R],
    *,
    table: str = DEFAULT_TABLE,
    dialect: Optional[str] = None,
    on_decision: Optional[Callable[[Decision], None]] = None,
    join: bool = True,
) -> Optional[R]:
    """Run ``busi(conn)`` under the barrier in one local transaction (protocol.md §7).

    Returns ``busi``'s result, or ``None`` when the call was a duplicate, suspended or a null
    compensation (committed without running ``busi``). Raises DtmDuplicated for a repeated msg,
    BarrierConflict on lock conflicts, BarrierDatabaseError on database failures, and whatever
    ``busi`` raised otherwise (after rolling the barrier rows back with it). ``conn`` is held for
    the call: another thread's call on it meanwhile is refused (DtmInvalidInput). ``join=False``
    refuses a SQLAlchemy Connection/Session that already has a transaction open.
    """
    validate_table(table)
    store = _SqlStore(conn, adapt(conn, dialect, join), table, _where(barrier))
    with claimed(conn, threading.get_ident()):
        return run_barrier(store, barrier, busi, on_decision)


def query_prepared(
    conn: Any, trans_type: str, gid: str, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None
) -> None:
    """The msg ``query_prepared`` check (protocol.md §7): return on success, raise DtmFailure on rollback.

    ``conn`` is anything :func:`connection_from` accepts. Inserts the ``rollback`` marker for
    (gid, 00, msg, 01) unless the local transaction already inserted its row, then reads which one won.
    """
    validate_table(table)
    with connection_from(conn) as c, claimed(c, threading.get_ident()):
        store = _SqlStore(c, adapt(c, dialect, atomic=False), table, msg_where(gid))
        _flow.run(prepared_flow(store, trans_type, gid), store)


def create_schema(conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None) -> None:
    """Create the barrier schema/database and table if they do not exist (idempotent).

    On MySQL the server's version picks the key collation (MySQL 8 or MariaDB). An existing table is
    left as it is: :func:`barrier_preflight` reports one whose keys compare case-insensitively.
    """
    validate_table(table)
    adapter = adapt(conn, dialect, atomic=False)
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
