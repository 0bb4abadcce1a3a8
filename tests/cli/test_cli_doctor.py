"""``dtmcli doctor`` against a real coordinator and real databases it creates (and drops) itself."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Iterator

import psycopg2
import pymysql
import pytest
import redis
from services import MYSQL, POSTGRES, REDIS, require

from dtmcli.barrier import create_schema
from dtmcli.cli._doctor import (
    FAIL,
    OK,
    WARN,
    Check,
    doctor_exit_code,
    parse_db_url,
    prepared_transactions_check,
    skew_check,
)

from .conftest import Cli

UNREACHABLE = "http://127.0.0.1:1/api/dtmsvr"
MARIADB_URL = f"mysql://root@{MYSQL['host']}:3306"
PG_URL = f"postgresql://postgres@{POSTGRES['host']}:5432/test"
REDIS_URL = f"redis://{REDIS['host']}:6379/0"


def lines(out: str) -> list[tuple[str, str]]:
    """(status, rest) of each check line."""
    return [(line[:4].strip(), line[5:]) for line in out.splitlines() if not line.startswith(" ")]


@pytest.fixture
def mariadb_db() -> Iterator[str]:
    """A fresh MariaDB database: ``bad`` has a case-insensitive barrier table, ``good`` one from create_schema."""
    require("mysql")
    name = f"dtmcli_doctor_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host=MYSQL["host"], port=3306, user="root", password="", charset="utf8mb4",
                           autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
            cur.execute(
                f"CREATE TABLE {name}.bad (id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY, trans_type varchar(45), "
                "gid varchar(128), branch_id varchar(128), op varchar(45), barrier_id varchar(45), reason varchar(45), "
                "UNIQUE KEY uniq (gid, branch_id, op, barrier_id)) DEFAULT CHARSET utf8mb4 COLLATE utf8mb4_general_ci"
            )
        create_schema(conn, table=f"{name}.good")
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.close()


@pytest.fixture
def pg_table() -> Iterator[str]:
    """A good barrier table in a fresh PostgreSQL schema."""
    require("postgres")
    schema = f"dtmcli_doctor_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(**POSTGRES)
    try:
        create_schema(conn, table=f"{schema}.barrier")
        conn.commit()
        yield f"{schema}.barrier"
    finally:
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.commit()
        conn.close()


# -- DTM and the exit code ----------------------------------------------------------------------


def test_dtm_reachable_with_version_and_clock_skew(cli: Cli) -> None:
    r = cli("doctor")
    assert r.code == 0, r.out
    found = lines(r.out)
    assert found[0][0] == OK and "v1.19.0-dtmcli.testing" in found[0][1]
    assert found[1][0] == OK and found[1][1].startswith("clock skew")


def test_dtm_unreachable_exits_3(cli: Cli) -> None:
    r = cli("doctor", dtm=UNREACHABLE)
    assert r.code == 3
    assert lines(r.out)[0][0] == FAIL and "cannot reach DTM" in r.out and "fix: start DTM" in r.out


def test_dtm_unreachable_and_another_failure_exits_1(cli: Cli) -> None:
    r = cli("doctor", "--redis", "redis://127.0.0.1:1/0", dtm=UNREACHABLE)
    assert r.code == 1
    assert [s for s, _ in lines(r.out)] == [FAIL, FAIL]


def test_exit_code_decision() -> None:
    unreachable = Check(FAIL, "DTM", "down", unreachable=True)
    assert doctor_exit_code([Check(OK, "a", ""), Check(WARN, "b", "")]) == 0
    assert doctor_exit_code([unreachable, Check(WARN, "b", "")]) == 3
    assert doctor_exit_code([unreachable, Check(FAIL, "db", "")]) == 1
    assert doctor_exit_code([Check(FAIL, "db", "")]) == 1


def test_skew_decision() -> None:
    now = 1_800_000_000.0
    assert skew_check("Mon, 01 Jan 2024 00:00:00 GMT", now, now).status == WARN  # far off
    from email.utils import formatdate

    assert skew_check(formatdate(now, usegmt=True), now - 0.1, now + 0.1).status == OK
    ahead = skew_check(formatdate(now + 30, usegmt=True), now, now)
    assert ahead.status == WARN and "30 s ahead" in ahead.detail and "NTP" in ahead.fix
    behind = skew_check(formatdate(now - 30, usegmt=True), now, now)
    assert "30 s behind" in behind.detail
    assert skew_check(None, now, now).status == WARN


def test_json_output(cli: Cli) -> None:
    r = cli("doctor", "--json", "--redis", "redis://127.0.0.1:1/0")
    rows = json.loads(r.out)
    assert [row["status"] for row in rows] == [OK, OK, FAIL] and r.code == 1
    assert rows[2]["fix"]


# -- databases -----------------------------------------------------------------------------------


def test_case_insensitive_mariadb_table_fails_with_the_fix(cli: Cli, mariadb_db: str) -> None:
    r = cli("doctor", "--db", f"{MARIADB_URL}/{mariadb_db}", "--table", f"{mariadb_db}.bad")
    assert r.code == 1
    bad = [rest for status, rest in lines(r.out) if status == FAIL]
    assert len(bad) == 1 and "[case_insensitive]" in bad[0] and "utf8mb4_general_ci" in bad[0]
    assert f"fix: convert the key columns to utf8mb4 and binary: ALTER TABLE {mariadb_db}.bad CONVERT" in r.out


def test_good_mariadb_table_and_xa(cli: Cli, mariadb_db: str) -> None:
    r = cli("doctor", "--db", f"{MARIADB_URL}/{mariadb_db}", "--table", f"{mariadb_db}.good", "--xa")
    assert r.code == 0, r.out
    found = lines(r.out)[2:]
    assert found[0] == (OK, f"barrier table {mariadb_db}.good: in {MARIADB_URL}/{mariadb_db}: exists, ids compare "
                            "exactly")
    assert found[1][0] == OK and "XA RECOVER allowed" in found[1][1]


def test_missing_table(cli: Cli, mariadb_db: str) -> None:
    r = cli("doctor", "--db", f"{MARIADB_URL}/{mariadb_db}", "--table", f"{mariadb_db}.nothing")
    assert r.code == 1 and "[missing_table]" in r.out and "create_schema" in r.out


def test_postgres_table_and_max_prepared_transactions(cli: Cli, pg_table: str) -> None:
    conn = psycopg2.connect(**POSTGRES)
    with conn.cursor() as cur:
        cur.execute("show max_prepared_transactions")
        setting = cur.fetchone()[0]
    conn.close()
    r = cli("doctor", "--db", PG_URL, "--table", pg_table, "--xa")
    found = lines(r.out)[2:]
    assert found[0][0] == OK and pg_table in found[0][1]
    if int(setting) > 0:
        assert r.code == 0, r.out
        assert found[1][0] == OK and f"max_prepared_transactions = {setting}" in found[1][1]
    else:
        assert r.code == 1 and found[1][0] == FAIL


def test_max_prepared_transactions_decision() -> None:
    off = prepared_transactions_check("0", "pg")
    assert off.status == FAIL and "restart" in off.fix
    assert prepared_transactions_check(None, "pg").status == FAIL
    assert prepared_transactions_check("20", "pg").status == OK


def test_database_url_problems(cli: Cli) -> None:
    r = cli("doctor", "--db", "sqlite:///tmp/x.db", "--db", "mysql://root:s3cret@127.0.0.1:1/x")
    assert r.code == 1
    assert [s for s, _ in lines(r.out)][2:] == [FAIL, FAIL]
    assert "scheme must be mysql" in r.out and "cannot connect" in r.out
    assert "s3cret" not in r.out and "mysql://root@127.0.0.1:1/x" in r.out


def test_parse_db_url() -> None:
    t = parse_db_url("mysql+pymysql://u%40x:p%3Aw@db.example:3307/shop")
    assert (t.dialect, t.host, t.port, t.user, t.password, t.database) == ("mysql", "db.example", 3307, "u@x", "p:w",
                                                                           "shop")
    assert parse_db_url("postgresql://h/db").dialect == "postgres" and parse_db_url("mariadb://h").port is None
    for bad in ("http://h/db", "mysql:///db", "mysql://h:port/db"):
        with pytest.raises(ValueError):
            parse_db_url(bad)


def test_missing_driver_names_the_extra(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if psycopg2 were not installed
    r = cli("doctor", "--db", PG_URL)
    assert r.code == 1 and "pip install 'dtmcli[postgres]'" in r.out


# -- redis ---------------------------------------------------------------------------------------


def test_redis_reachable_with_scripting(cli: Cli) -> None:
    require("redis")
    r = cli("doctor", "--redis", REDIS_URL)
    assert r.code == 0, r.out
    assert lines(r.out)[2] == (OK, f"{REDIS_URL}: reachable, scripting (EVAL) allowed")


def test_redis_without_scripting(cli: Cli) -> None:
    require("redis")
    admin = redis.Redis(host=REDIS["host"], port=6379)
    user = f"dtmcli_doctor_{uuid.uuid4().hex[:10]}"
    admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-@scripting")
    try:
        r = cli("doctor", "--redis", f"redis://{user}:pw@{REDIS['host']}:6379/0")
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
    assert r.code == 1
    status, rest = lines(r.out)[2]
    assert status == FAIL and "EVAL fails" in rest and "pw@" not in r.out
    assert "+@scripting" in r.out


def test_redis_unreachable(cli: Cli) -> None:
    r = cli("doctor", "--redis", "redis://127.0.0.1:1/0")
    assert r.code == 1 and "cannot reach Redis" in r.out
