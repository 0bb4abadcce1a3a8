"""Barrier tables on real MariaDB / PostgreSQL: custom names (10.5), binary keys and the table check (10.6).

Every test works in a database (MariaDB) or schema (PostgreSQL) created for it and dropped after it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
from conftest import query_all

from dtmcli import DtmFailure, DtmInvalidInput, local_gid
from dtmcli._barrier import sql as barrier_sql
from dtmcli.barrier import BranchBarrier, Decision, create_schema, ddl, query_prepared

NAMES = ["dtm_barrier_x", "barrier", "barrier2", "dtm_barrier", "app_barrier_log"]


@pytest.fixture(params=["mysql", "postgres"])
def fresh(request: pytest.FixtureRequest) -> tuple[str, str, Callable[[], Any]]:
    """(dialect, schema, connect) on a database/schema of its own."""
    dialect = str(request.param)
    schema, connect = request.getfixturevalue("mysql_db" if dialect == "mysql" else "pg_schema")
    return dialect, schema, connect


def tables_in(conn: Any, schema: str) -> list[str]:
    return sorted(str(r[0]) for r in query_all(
        conn, "select table_name from information_schema.tables where table_schema = %s", (schema,)))


def exercise(conn: Any, table: str) -> None:
    """A forward op, its duplicate, a null compensation and a msg + query_prepared on ``table``."""
    gid = local_gid()
    ran: list[str] = []
    assert BranchBarrier("saga", gid, "01", "action", table=table).call(conn, lambda tx: ran.append("a")) is None
    BranchBarrier("saga", gid, "01", "action", table=table).call(conn, lambda tx: ran.append("again"))
    comp = BranchBarrier("saga", gid, "02", "compensate", table=table)
    comp.call(conn, lambda tx: ran.append("c"))
    assert ran == ["a"] and comp.last_decision is Decision.NULL_COMPENSATION
    BranchBarrier.for_msg(gid, table=table).call(conn, lambda tx: None)
    query_prepared(gid, conn, table=table)  # committed
    with pytest.raises(DtmFailure):
        query_prepared(local_gid(), conn, table=table)  # never ran
    assert query_all(conn, f"select count(*) from {table} where gid = %s", (gid,)) == [(4,)]


@pytest.mark.parametrize("name", NAMES)
def test_qualified_custom_table_is_created_under_its_own_name(fresh: Any, name: str) -> None:
    _dialect, schema, connect = fresh
    conn = connect()
    table = f"{schema}.{name}"
    create_schema(conn, table=table)
    create_schema(conn, table=table)  # idempotent
    assert tables_in(conn, schema) == [name]
    exercise(conn, table)


@pytest.mark.parametrize("name", ["dtm_barrier_x", "barrier"])
def test_unqualified_custom_table_lands_in_the_connection_schema(fresh: Any, name: str) -> None:
    _dialect, schema, connect = fresh
    conn = connect()
    create_schema(conn, table=name)
    assert tables_in(conn, schema) == [name]
    exercise(conn, name)


def test_two_custom_tables_side_by_side_in_one_schema(fresh: Any) -> None:
    """Constraint/index/sequence names derive from the table name, so tables do not collide."""
    _dialect, schema, connect = fresh
    conn = connect()
    for name in ("barrier", "barrier_b"):
        create_schema(conn, table=f"{schema}.{name}")
    assert tables_in(conn, schema) == ["barrier", "barrier_b"]
    for name in ("barrier", "barrier_b"):
        exercise(conn, f"{schema}.{name}")


@pytest.mark.parametrize("dialect", ["mysql", "mariadb", "postgres"])
def test_ddl_text_names_only_the_given_table(dialect: str) -> None:
    text = ddl(dialect, "app.dtm_barrier_x")
    assert "CREATE TABLE IF NOT EXISTS app.dtm_barrier_x (" in text
    assert "dtm_barrier.barrier" not in text and "app_x" not in text
    if dialect == "postgres":
        assert "nextval('app.dtm_barrier_x_seq')" in text
        assert "CONSTRAINT uniq_dtm_barrier_x UNIQUE (gid, branch_id, op, barrier_id)" in text
        assert "ON app.dtm_barrier_x (create_time)" in text
    else:
        assert "CREATE DATABASE IF NOT EXISTS app " in text
    assert "{" not in text.replace("{ gid", "")  # no unfilled placeholder


def test_too_long_table_names_are_refused_before_any_sql() -> None:
    """Derived names (uniq_<t>, <t>_create_time, <t>_seq) must fit the 63-character identifier limit."""
    with pytest.raises(DtmInvalidInput):
        ddl("postgres", "s." + "t" * 49)
    assert "t" * 48 in ddl("postgres", "s." + "t" * 48)


def test_stale_postgres_comment_is_gone() -> None:
    assert "must be named uniq_barrier" not in ddl("postgres")


# --- 10.6: binary, NO PAD keys ---------------------------------------------------------------

LOOKALIKES = [("Order-{}", "order-{}"), ("x{}", "x{} "), ("é{}", "e{}")]


@pytest.mark.parametrize("pair", LOOKALIKES, ids=["case", "trailing-space", "accent"])
def test_lookalike_gids_are_different_transactions_on_mariadb(mysql_db: Any, pair: tuple[str, str]) -> None:
    """Before: utf8mb4_general_ci merged them and the second transaction's effect was skipped."""
    schema, connect = mysql_db
    conn = connect()
    table = f"{schema}.barrier"
    create_schema(conn, table=table)
    suffix = local_gid()
    ran: list[str] = []
    for gid in (pair[0].format(suffix), pair[1].format(suffix)):
        bb = BranchBarrier("saga", gid, "01", "action", table=table)
        bb.call(conn, lambda tx, g=gid: ran.append(g))
        assert bb.last_decision is Decision.RUN
    assert ran == [pair[0].format(suffix), pair[1].format(suffix)]
    assert barrier_sql.barrier_preflight(conn, table=table) == []
    # character columns: the driver still returns str, not bytes
    assert query_all(conn, f"select gid, op from {table} where gid = %s", (ran[0],)) == [(ran[0], "action")]


def test_mysql8_and_mariadb_ddl_use_a_no_pad_binary_collation() -> None:
    assert "COLLATE = utf8mb4_0900_bin;" in ddl("mysql")
    assert "COLLATE = utf8mb4_nopad_bin;" in ddl("mariadb")


def _old_table(conn: Any, table: str, collation: str) -> None:
    """A barrier table as the old DDL made it (utf8mb4 default collation), or with ``collation``."""
    cur = conn.cursor()
    cur.execute(
        f"create table {table} (id bigint not null auto_increment primary key, trans_type varchar(45) not null "
        "default '', gid varchar(128) not null default '', branch_id varchar(128) not null default '', "
        "op varchar(45) not null default '', barrier_id varchar(45) not null default '', reason varchar(45) "
        "not null default '', unique key uniq_barrier (gid, branch_id, op, barrier_id)) "
        f"default charset = utf8mb4 collate = {collation}"
    )
    conn.commit()


def test_table_check_reports_a_case_insensitive_table_and_the_migration_fixes_it(mysql_db: Any) -> None:
    schema, connect = mysql_db
    conn = connect()
    table = f"{schema}.old_barrier"
    _old_table(conn, table, "utf8mb4_general_ci")
    findings = barrier_sql.barrier_preflight(conn, table=table)
    assert [f.code for f in findings] == ["case_insensitive"]
    assert "gid (utf8mb4_general_ci)" in findings[0].message and "'Order-x'" in findings[0].message
    migration = barrier_sql.mysql_migration(table, "mariadb")
    assert migration in findings[0].fix
    assert migration == f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin;"
    conn.cursor().execute(migration)
    assert barrier_sql.barrier_preflight(conn, table=table) == []
    exercise(conn, table)


def test_table_check_reports_pad_space_binary_collation(mysql_db: Any) -> None:
    """utf8mb4_bin compares bytes but pads: 'x' = 'x ' on MariaDB 10.x and MySQL."""
    schema, connect = mysql_db
    conn = connect()
    table = f"{schema}.bin_barrier"
    _old_table(conn, table, "utf8mb4_bin")
    assert [f.code for f in barrier_sql.barrier_preflight(conn, table=table)] == ["pad_space"]


def test_table_check_reports_a_missing_table(fresh: Any) -> None:
    _dialect, schema, connect = fresh
    findings = barrier_sql.barrier_preflight(connect(), table=f"{schema}.nope")
    assert [(f.code, f.table) for f in findings] == [("missing_table", f"{schema}.nope")]


def test_table_check_takes_a_factory_and_a_fine_postgres_table(pg_schema: Any) -> None:
    schema, connect = pg_schema
    create_schema(connect(), table=f"{schema}.barrier")
    assert barrier_sql.barrier_preflight(connect, table=f"{schema}.barrier") == []


def test_table_check_reports_a_nondeterministic_postgres_collation(pg_schema: Any) -> None:
    schema, connect = pg_schema
    conn = connect()
    cur = conn.cursor()
    cur.execute(f"create collation {schema}.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
    cur.execute(f"create table {schema}.ci_barrier (gid varchar(128) collate {schema}.ci, branch_id varchar(128), "
                "op varchar(45), barrier_id varchar(45), unique (gid, branch_id, op, barrier_id))")
    conn.commit()
    findings = barrier_sql.barrier_preflight(conn, table=f"{schema}.ci_barrier")
    assert [f.code for f in findings] == ["case_insensitive"] and "gid (ci)" in findings[0].message
    cur.execute(findings[0].fix)  # the suggested statement is valid and fixes it
    conn.commit()
    assert barrier_sql.barrier_preflight(conn, table=f"{schema}.ci_barrier") == []


def _questions(conn: Any) -> int:
    cur = conn.cursor()
    cur.execute("show session status like 'Questions'")
    value = int(cur.fetchone()[1])
    cur.close()
    return value


def test_runtime_warning_once_per_table_and_no_extra_round_trip_after(
    mysql_db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The first barrier call on a case-insensitive table logs a WARNING; later calls run no check query."""
    schema, connect = mysql_db
    conn = connect()
    table = f"{schema}.old_barrier"
    _old_table(conn, table, "utf8mb4_general_ci")
    costs = []
    with caplog.at_level(logging.WARNING, logger="dtmcli"):
        for _ in range(3):
            before = _questions(conn)
            BranchBarrier("saga", local_gid(), "01", "action", table=table).call(conn, lambda tx: None)
            costs.append(_questions(conn) - before - 1)  # minus the SHOW STATUS itself
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "case- or accent-insensitively" in warnings[0]
    assert "CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin" in warnings[0]
    assert costs[0] == costs[1] + 1 and costs[1] == costs[2]  # the check ran once, in the first call


def test_no_warning_for_a_table_made_by_create_schema(mysql_db: Any, caplog: pytest.LogCaptureFixture) -> None:
    schema, connect = mysql_db
    conn = connect()
    create_schema(conn, table=f"{schema}.barrier")
    with caplog.at_level(logging.WARNING, logger="dtmcli"):
        BranchBarrier("saga", local_gid(), "01", "action", table=f"{schema}.barrier").call(conn, lambda tx: None)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
