"""barrier_preflight: the unique key on (gid, branch_id, op, barrier_id), missing key columns, citext/char(n)."""

from __future__ import annotations

from typing import Any

import pytest

from dtmcli._barrier import sql as barrier_sql

COLUMNS = ("gid varchar(128) not null default '', branch_id varchar(128) not null default '', "
           "op varchar(45) not null default '', barrier_id varchar(45) not null default '', "
           "reason varchar(45) not null default ''")
KEY = "(gid, branch_id, op, barrier_id)"


def _make(conn: Any, table: str, body: str, suffix: str = "") -> None:
    cur = conn.cursor()
    cur.execute(f"create table {table} ({body}){suffix}")
    conn.commit()


MYSQL_SUFFIX = " default charset = utf8mb4 collate = utf8mb4_nopad_bin"


@pytest.mark.parametrize(("body", "codes"), [
    (COLUMNS, ["missing_unique_key"]),
    (f"{COLUMNS}, key k {KEY}", ["missing_unique_key"]),  # not unique
    (f"{COLUMNS}, unique key k (gid, branch_id, op)", ["missing_unique_key"]),  # not all four
    (f"{COLUMNS}, unique key k (gid, branch_id, op, barrier_id, reason)", ["missing_unique_key"]),  # more
    (f"{COLUMNS}, unique key k (gid(10), branch_id, op, barrier_id)", ["missing_unique_key"]),  # prefix
    (f"{COLUMNS}, unique key k (barrier_id, op, branch_id, gid)", []),
    (f"{COLUMNS}, primary key {KEY}", []),
    ("gid varchar(128), branch_id varchar(128), op varchar(45), reason varchar(45)", ["missing_column"]),
])
def test_mysql_key_is_checked(mysql_db: Any, body: str, codes: list[str]) -> None:
    schema, connect = mysql_db
    conn = connect()
    table = f"{schema}.k_barrier"
    _make(conn, table, body, MYSQL_SUFFIX)
    findings = barrier_sql.barrier_preflight(conn, table=table)
    assert [f.code for f in findings] == codes
    if codes == ["missing_unique_key"]:
        conn.cursor().execute(f"alter table {table} drop index k") if "key k" in body else None
        conn.cursor().execute(findings[0].fix.split("; or ")[0])  # the suggested statement fixes it
        assert barrier_sql.barrier_preflight(conn, table=table) == []
    if codes == ["missing_column"]:
        assert "barrier_id" in findings[0].message and "dtmcli.sql ddl mariadb" in findings[0].fix


@pytest.mark.parametrize(("body", "codes"), [
    (COLUMNS, ["missing_unique_key"]),
    (f"{COLUMNS}, unique (gid, branch_id, op)", ["missing_unique_key"]),
    (f"{COLUMNS}, unique {KEY} deferrable initially deferred", ["missing_unique_key"]),
    (f"{COLUMNS}, unique {KEY}", []),
    (f"{COLUMNS}, primary key (barrier_id, op, branch_id, gid)", []),
    ("gid varchar(128), op varchar(45), barrier_id varchar(45), reason varchar(45)", ["missing_column"]),
])
def test_postgres_key_is_checked(pg_schema: Any, body: str, codes: list[str]) -> None:
    schema, connect = pg_schema
    conn = connect()
    table = f"{schema}.k_barrier"
    _make(conn, table, body)
    findings = barrier_sql.barrier_preflight(conn, table=table)
    assert [f.code for f in findings] == codes
    if codes == ["missing_unique_key"] and "unique" not in body:
        conn.cursor().execute(findings[0].fix.split("; or ")[0])
        conn.commit()
        assert barrier_sql.barrier_preflight(conn, table=table) == []


def test_postgres_partial_or_expression_unique_index_does_not_count(pg_schema: Any) -> None:
    schema, connect = pg_schema
    conn = connect()
    table = f"{schema}.p_barrier"
    _make(conn, table, COLUMNS)
    conn.cursor().execute(f"create unique index on {table} {KEY} where op <> 'x'")
    conn.cursor().execute(f"create unique index on {table} (lower(gid), branch_id, op, barrier_id)")
    conn.commit()
    assert [f.code for f in barrier_sql.barrier_preflight(conn, table=table)] == ["missing_unique_key"]


@pytest.mark.parametrize(("column_type", "code"), [("citext", "case_insensitive"), ("char(128)", "pad_space")])
def test_postgres_citext_and_char_keys_are_reported(pg_schema: Any, column_type: str, code: str) -> None:
    schema, connect = pg_schema
    conn = connect()
    cur = conn.cursor()
    if column_type == "citext":
        cur.execute(f"create extension if not exists citext schema {schema}")
        cur.execute("select n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace "
                    "where e.extname = 'citext'")
        column_type = f"{cur.fetchone()[0]}.citext"  # the extension may live in another schema already
    table = f"{schema}.t_barrier"
    _make(conn, table, f"gid {column_type}, branch_id varchar(128), op varchar(45), barrier_id varchar(45), "
          f"reason varchar(45), unique {KEY}")
    findings = barrier_sql.barrier_preflight(conn, table=table)
    assert [f.code for f in findings] == [code] and "gid" in findings[0].message
    cur.execute(findings[0].fix)  # valid, and it fixes the table
    conn.commit()
    assert barrier_sql.barrier_preflight(conn, table=table) == []
