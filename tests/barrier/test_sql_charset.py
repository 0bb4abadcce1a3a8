"""Character sets on real MariaDB, and a failed Django commit on real PostgreSQL (review 10, findings 1, 2, 5).

1. Over a MySQL connection that is not utf8mb4 (``utf8`` = utf8mb3), the server stores a character it
   cannot convert as ``?`` and INSERT IGNORE keeps only a warning: two distinct gids shared barrier
   rows. The barrier now refuses such a connection (BarrierDatabaseError) before writing anything.
2. The table check also reads each key column's character set: utf8mb3 or latin1 columns merge
   distinct gids the same way, whatever their collation.
5. When the barrier's Django atomic block failed to commit, its rollback left the atomic block a
   second time and popped the caller's enclosing block.

The MariaDB tests work in a database created for each test and dropped after it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Iterator

import pytest
from conftest import query_all
from services import MYSQL

from dtmcli import BarrierDatabaseError, local_gid
from dtmcli._barrier import sql as barrier_sql
from dtmcli.barrier import BranchBarrier, Decision, create_schema, query_prepared

EMOJI_PAIR = ("\U0001F600", "\U0001F601")  # beyond U+FFFF: utf8mb3 cannot hold them


def _rows(conn: Any, table: str, prefix: str) -> list[tuple[Any, ...]]:
    """Rows whose gid starts with ``prefix``; not LIKE: MariaDB 10.11 misses 4-byte tails in a *_bin index range."""
    return query_all(conn, f"select gid, op, reason from {table} where left(gid, %s) = %s", (len(prefix), prefix))


def _questions(conn: Any) -> int:
    cur = conn.cursor()
    cur.execute("show session status like 'Questions'")
    value = int(cur.fetchone()[1])
    cur.close()
    return value


# --- 1: the connection's character set ----------------------------------------------------------


def test_utf8mb3_connection_is_refused_instead_of_merging_two_gids(mysql_db: Any) -> None:
    """Before: the 😀 gid ran, the 😁 gid was answered DUPLICATE (both stored as 'ord-…????')."""
    schema, connect = mysql_db
    table = f"{schema}.barrier"
    create_schema(connect(), table=table)
    narrow = connect("utf8")
    base = "ord-" + local_gid()
    ran: list[str] = []
    for gid in (base + EMOJI_PAIR[0], base + EMOJI_PAIR[1]):
        with pytest.raises(BarrierDatabaseError, match=r"not utf8mb4.*connect with charset utf8mb4") as info:
            BranchBarrier("saga", gid, "01", "action", table=table).call(narrow, lambda tx, g=gid: ran.append(g))
        assert info.value.gid == gid
    assert ran == []
    assert _rows(connect(), table, base) == []  # nothing written
    assert query_all(narrow, "select 1") == [(1,)]  # the connection is still usable, no transaction left open

    wide = connect("utf8mb4")  # the same two gids over utf8mb4: two transactions, two effects
    for gid in (base + EMOJI_PAIR[0], base + EMOJI_PAIR[1]):
        bb = BranchBarrier("saga", gid, "01", "action", table=table)
        bb.call(wide, lambda tx, g=gid: ran.append(g))
        assert bb.last_decision is Decision.RUN
    assert ran == [base + EMOJI_PAIR[0], base + EMOJI_PAIR[1]]
    assert sorted(r[0] for r in _rows(wide, table, base)) == sorted(ran)


def test_utf8mb3_connection_is_refused_by_query_prepared(mysql_db: Any) -> None:
    """Before: query_prepared stored its 'rollback' marker under 'g-…????', the key of other gids too."""
    schema, connect = mysql_db
    table = f"{schema}.barrier"
    create_schema(connect(), table=table)
    base = "g-" + local_gid()
    with pytest.raises(BarrierDatabaseError, match="connect with charset utf8mb4"):
        query_prepared(base + EMOJI_PAIR[0], connect("utf8"), table=table)
    assert _rows(connect(), table, base) == []


@pytest.mark.parametrize("charset", ["utf8", "utf8mb3", "latin1"])
def test_sqlalchemy_engine_with_a_narrow_charset_is_refused(mysql_db: Any, charset: str) -> None:
    """The check looks through SQLAlchemy to the DB-API connection."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    schema, connect = mysql_db
    table = f"{schema}.barrier"
    create_schema(connect(), table=table)
    url = f"mysql+pymysql://{MYSQL['user']}@{MYSQL['host']}:{MYSQL['port']}/{schema}"
    narrow = sqlalchemy.create_engine(f"{url}?charset={charset}")
    wide = sqlalchemy.create_engine(f"{url}?charset=utf8mb4")
    try:
        gid = "sa-" + local_gid()
        with pytest.raises(BarrierDatabaseError, match="utf8mb4"):
            BranchBarrier("saga", gid, "01", "action", table=table).call_with_db(narrow, lambda tx: None)
        with narrow.connect() as sa_conn:
            with pytest.raises(BarrierDatabaseError, match="utf8mb4"):
                BranchBarrier("saga", gid, "01", "action", table=table).call(sa_conn, lambda tx: None)
            assert not sa_conn.in_transaction()  # the barrier's transaction was rolled back
        bb = BranchBarrier("saga", gid, "01", "action", table=table)
        bb.call_with_db(wide, lambda tx: None)
        assert bb.last_decision is Decision.RUN
    finally:
        narrow.dispose()
        wide.dispose()


class _UnknownDriverConnection:
    """A DB-API connection of a driver dtmcli does not know (so it cannot read the charset attribute)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def cursor(self) -> Any:
        return self._conn.cursor()

    def begin(self) -> None:
        self._conn.begin()

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        self._conn.rollback()


# Statements per call: the mode switch (the driver's autocommit mode is unknown: saved in a user variable and
# turned off), [@@character_set_connection], [table check], then ROLLBACK + the mode's restore, or INSERT + the
# re-read of the row (MySQL rolls back a deadlocked transaction under the business code) + the restore, which
# is the COMMIT too.
@pytest.mark.parametrize(("charset", "refused", "expected"), [("utf8", True, [4, 3, 3]), ("utf8mb4", False, [6, 4, 4])])
def test_unknown_driver_charset_is_read_once_per_connection(
    mysql_db: Any, charset: str, refused: bool, expected: list[int]
) -> None:
    schema, connect = mysql_db
    table = f"{schema}.barrier"
    create_schema(connect(), table=table)
    raw = connect(charset)
    conn = _UnknownDriverConnection(raw)
    costs = []
    for _ in range(3):
        before = _questions(raw)
        bb = BranchBarrier("saga", local_gid(), "01", "action", table=table)
        if refused:
            with pytest.raises(BarrierDatabaseError, match="'utf8mb3', not utf8mb4"):
                bb.call(conn, lambda tx: None, dialect="mysql")
        else:
            bb.call(conn, lambda tx: None, dialect="mysql")
            assert bb.last_decision is Decision.RUN
        costs.append(_questions(raw) - before - 1)  # minus the SHOW STATUS itself
    assert costs == expected  # @@character_set_connection is read on the first call only


@pytest.mark.parametrize("as_mysql8", [False, True], ids=["server", "mysql8_handshake"])
def test_no_extra_round_trip_per_call_with_pymysql(mysql_db: Any, as_mysql8: bool) -> None:
    """PyMySQL tells its character set without a query: a forward op costs insert + commit, plus the re-read
    of the row on MySQL; on MariaDB (>= 10.1) the re-read rides in the COMMIT's statement (Questions counts
    the client's statements only), so 2 there and 3 on MySQL 8 (also run with a MySQL 8 handshake version)."""
    from dtmcli._barrier.sql_conn import mariadb_version

    schema, connect = mysql_db
    table = f"{schema}.barrier"
    create_schema(connect(), table=table)
    conn = connect()
    if as_mysql8:
        conn.server_version = "8.0.36"
    BranchBarrier("saga", local_gid(), "01", "action", table=table).call(conn, lambda tx: None)  # table check
    before = _questions(conn)
    BranchBarrier("saga", local_gid(), "01", "action", table=table).call(conn, lambda tx: None)
    version = mariadb_version(conn)
    assert _questions(conn) - before - 1 == (2 if version is not None and version >= (10, 1) else 3)


def test_preflight_reports_a_narrow_connection(mysql_db: Any) -> None:
    schema, connect = mysql_db
    table = f"{schema}.barrier"
    create_schema(connect(), table=table)
    assert barrier_sql.barrier_preflight(connect(), table=table) == []
    findings = barrier_sql.barrier_preflight(connect("utf8"), table=table)
    assert [f.code for f in findings] == ["connection_charset"]
    assert "'utf8'" in findings[0].message and "charset utf8mb4" in findings[0].fix


# --- 2: the key columns' character set ----------------------------------------------------------

NARROW_TABLES = [
    ("utf8mb3", "utf8mb3_nopad_bin", EMOJI_PAIR, ["narrow_charset"]),
    ("latin1", "latin1_nopad_bin", ("\u0151", "\u0171"), ["narrow_charset"]),  # ő / ű are not in latin1
    ("latin1", "latin1_swedish_ci", ("\u0151", "\u0171"), ["narrow_charset", "case_insensitive"]),
]


def _narrow_table(conn: Any, table: str, charset: str, collation: str) -> None:
    cur = conn.cursor()
    cur.execute(
        f"create table {table} (id bigint not null auto_increment primary key, trans_type varchar(45) not null "
        "default '', gid varchar(128) not null default '', branch_id varchar(128) not null default '', "
        "op varchar(45) not null default '', barrier_id varchar(45) not null default '', reason varchar(45) "
        "not null default '', unique key uniq_barrier (gid, branch_id, op, barrier_id)) "
        f"default charset = {charset} collate = {collation}"
    )
    conn.commit()


@pytest.mark.parametrize(("charset", "collation", "chars", "codes"), NARROW_TABLES,
                         ids=[t[1] for t in NARROW_TABLES])
def test_table_check_reports_a_narrow_charset_and_the_migration_fixes_it(
    mysql_db: Any, charset: str, collation: str, chars: tuple[str, str], codes: list[str]
) -> None:
    """Before: a *_nopad_bin collation passed clean although its character set merges distinct gids."""
    schema, connect = mysql_db
    conn = connect()
    table = f"{schema}.old_barrier"
    _narrow_table(conn, table, charset, collation)
    findings = barrier_sql.barrier_preflight(conn, table=table)
    assert [f.code for f in findings] == codes
    assert f"gid ({charset})" in findings[0].message and "'?'" in findings[0].message
    migration = barrier_sql.mysql_migration(table, "mariadb")
    assert all(migration in f.fix for f in findings)
    conn.cursor().execute(migration)
    assert barrier_sql.barrier_preflight(conn, table=table) == []
    base = "o" + local_gid()
    ran: list[str] = []
    for gid in (base + chars[0], base + chars[1]):
        bb = BranchBarrier("saga", gid, "01", "action", table=table)
        bb.call(conn, lambda tx, g=gid: ran.append(g))
        assert bb.last_decision is Decision.RUN
    assert len(ran) == 2


def test_runtime_check_warns_about_a_narrow_charset_table(mysql_db: Any, caplog: pytest.LogCaptureFixture) -> None:
    schema, connect = mysql_db
    conn = connect()
    table = f"{schema}.old_barrier"
    _narrow_table(conn, table, "utf8mb3", "utf8mb3_nopad_bin")
    with caplog.at_level(logging.WARNING, logger="dtmcli"):
        BranchBarrier("saga", local_gid(), "01", "action", table=table).call(conn, lambda tx: None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gid (utf8mb3)" in warnings[0] and "CONVERT TO CHARACTER SET utf8mb4" in warnings[0]


def test_binary_key_columns_have_no_charset_finding() -> None:
    assert barrier_sql._mysql_column_problems("varbinary", None, None) == []
    assert barrier_sql._mysql_column_problems("varchar", "utf8mb4", "utf8mb4_nopad_bin") == []
    assert barrier_sql._mysql_column_problems("varchar", "utf8mb3", "utf8mb3_nopad_bin") == ["narrow_charset"]


# --- 5: Django, a failing commit of the barrier's atomic block -----------------------------------


@pytest.fixture
def django_biz(django_conn: Any) -> Iterator[tuple[Any, str]]:
    """The Django connection and a fresh business table of the caller."""
    table = f"public.dtmcli_z1_{uuid.uuid4().hex[:10]}"
    with django_conn.cursor() as cur:
        cur.execute(f"create table {table} (v text)")
    try:
        yield django_conn, table
    finally:
        with django_conn.cursor() as cur:
            cur.execute(f"drop table {table}")


def _failing_release(monkeypatch: pytest.MonkeyPatch, conn: Any, times: int) -> None:
    """RELEASE SAVEPOINT fails ``times`` times (as on a connection hiccup), then works again."""
    from django.db import DatabaseError

    original = conn.savepoint_commit
    left = [times]

    def savepoint_commit(sid: str) -> None:
        if left[0] > 0:
            left[0] -= 1
            raise DatabaseError("simulated RELEASE SAVEPOINT failure")
        original(sid)

    monkeypatch.setattr(conn, "savepoint_commit", savepoint_commit)


def _barrier_rows(conn: Any, gid: str) -> list[Any]:
    with conn.cursor() as cur:
        cur.execute("select op from dtm_barrier.barrier where gid = %s", (gid,))
        return list(cur.fetchall())


def test_django_failed_barrier_commit_keeps_the_callers_atomic_block(
    django_biz: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the second exit popped the caller's block; its first write was lost and the second autocommitted."""
    from django.db import transaction

    conn, biz = django_biz
    gid = local_gid()
    with transaction.atomic(using=conn.alias):
        with conn.cursor() as cur:
            cur.execute(f"insert into {biz} values ('before')")
        _failing_release(monkeypatch, conn, times=1)
        with pytest.raises(BarrierDatabaseError, match="commit failed"):
            BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: None)
        monkeypatch.undo()
        assert conn.in_atomic_block and len(conn.atomic_blocks) == 1 and not conn.needs_rollback
        with conn.cursor() as cur:
            cur.execute(f"insert into {biz} values ('after')")
    with conn.cursor() as cur:
        cur.execute(f"select v from {biz} order by v")
        assert cur.fetchall() == [("after",), ("before",)]
    assert _barrier_rows(conn, gid) == []  # the barrier's savepoint was rolled back


def test_django_unrecoverable_barrier_commit_rolls_back_the_whole_caller_block(
    django_biz: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When Django cannot even roll the savepoint back, the caller's block fails as a whole: nothing half-done."""
    from django.db import transaction
    from django.db.transaction import TransactionManagementError

    conn, biz = django_biz
    gid = local_gid()
    with pytest.raises(TransactionManagementError), transaction.atomic(using=conn.alias):
        with conn.cursor() as cur:
            cur.execute(f"insert into {biz} values ('before')")
        _failing_release(monkeypatch, conn, times=10)
        try:
            with pytest.raises(BarrierDatabaseError, match="commit failed"):
                BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: None)
        finally:
            monkeypatch.undo()
        assert conn.in_atomic_block and conn.needs_rollback
        with conn.cursor() as cur:
            cur.execute(f"insert into {biz} values ('after')")  # refused: the block must roll back
    assert not conn.in_atomic_block
    with conn.cursor() as cur:
        cur.execute(f"select v from {biz}")
        assert cur.fetchall() == []
    assert _barrier_rows(conn, gid) == []
