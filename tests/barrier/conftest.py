"""Fixtures for the barrier tests: real MariaDB / PostgreSQL / Redis connections and a balance table.

Every test uses fresh gids (``dtmcli.local_gid()``), so the suite can run again and again on the
same databases; the barrier schema is created idempotently once per session.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Iterator

import pytest
from services import MYSQL, POSTGRES, REDIS, mysql_connect, psycopg2_connect, psycopg_connect, require

from dtmcli.barrier import create_schema

BALANCE_TABLE = "dtmcli_barrier_balance"
EFFECT_TABLE = "dtmcli_barrier_effect"

SQL_DRIVERS = ("pymysql", "psycopg2", "psycopg")


CONNECT: dict[str, Callable[[], Any]] = {
    "pymysql": mysql_connect, "psycopg2": psycopg2_connect, "psycopg": psycopg_connect,
}
SERVICE = {"pymysql": "mysql", "psycopg2": "postgres", "psycopg": "postgres"}

_prepared: set[str] = set()


def _prepare(service: str) -> None:
    """Create the barrier schema and the test tables once per service (idempotent)."""
    if service in _prepared:
        return
    conn = mysql_connect() if service == "mysql" else psycopg2_connect()
    try:
        create_schema(conn)
        create_schema(conn)  # idempotent
        cur = conn.cursor()
        cur.execute(
            f"create table if not exists {BALANCE_TABLE} (user_id varchar(128) primary key, balance int not null)"
        )
        cur.execute(
            f"create table if not exists {EFFECT_TABLE} (gid varchar(128) not null, op varchar(45) not null, "
            "note varchar(64) not null default '')"
        )
        conn.commit()
    finally:
        conn.close()
    _prepared.add(service)


@pytest.fixture(params=SQL_DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """Each SQL test runs with PyMySQL (MariaDB), psycopg2 and psycopg 3 (PostgreSQL)."""
    name = str(request.param)
    require(SERVICE[name])
    _prepare(SERVICE[name])
    return name


@pytest.fixture
def connect(driver: str) -> Iterator[Callable[[], Any]]:
    """A factory of new connections for the current driver; all are closed after the test."""
    opened: list[Any] = []

    def make() -> Any:
        conn = CONNECT[driver]()
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        try:
            conn.close()
        except Exception as exc:  # a connection the test killed on purpose cannot close cleanly
            logging.getLogger("tests").debug("closing a test connection failed: %s", exc)


@pytest.fixture
def conn(connect: Callable[[], Any]) -> Any:
    """One connection of the current driver."""
    return connect()


@pytest.fixture
def mysql_ready() -> None:
    """MariaDB is up and has the barrier schema."""
    require("mysql")
    _prepare("mysql")


@pytest.fixture
def postgres_ready() -> None:
    """PostgreSQL is up and has the barrier schema."""
    require("postgres")
    _prepare("postgres")


@pytest.fixture
def redis_client() -> Iterator[Any]:
    """A Redis client on the test server."""
    require("redis")
    import redis

    client = redis.Redis(host=REDIS["host"], port=REDIS["port"])
    yield client
    client.close()


def query_all(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run a read on ``conn`` and end its transaction."""
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        rows = [tuple(r) for r in cur.fetchall()]
    finally:
        cur.close()
    conn.rollback()
    return rows


def execute(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> int:
    """Run one statement on ``conn`` and return ``cursor.rowcount`` (no commit)."""
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return int(cur.rowcount)
    finally:
        cur.close()


@pytest.fixture
def django_conn(postgres_ready: None) -> Iterator[Any]:
    """A Django connection to the test PostgreSQL database (Django is configured once if needed)."""
    import django
    from django.conf import settings

    alias = "dtmcli_barrier_pg"
    db = {"ENGINE": "django.db.backends.postgresql", "NAME": POSTGRES["dbname"], "USER": POSTGRES["user"],
          "HOST": POSTGRES["host"], "PORT": str(POSTGRES["port"])}
    if not settings.configured:
        settings.configure(DATABASES={"default": dict(db), alias: dict(db)}, USE_TZ=True)
        django.setup()
    from django.db import connections

    if alias not in connections.settings:
        connections.settings[alias] = connections.configure_settings({"default": dict(db), alias: db})[alias]
    conn = connections[alias]
    yield conn
    conn.close()


@pytest.fixture
def mysql_db() -> Iterator[tuple[str, Callable[..., Any]]]:
    """A fresh MariaDB database and a factory of PyMySQL connections to it (``charset`` selectable)."""
    require("mysql")
    name = f"dtmcli_t_{uuid.uuid4().hex[:10]}"
    admin = mysql_connect()
    opened: list[Any] = [admin]

    def connect(charset: str = "utf8mb4") -> Any:
        import pymysql

        conn = pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                               password=MYSQL["password"], database=name, charset=charset)
        opened.append(conn)
        return conn

    admin.cursor().execute(f"create database {name}")
    try:
        yield name, connect
    finally:
        admin.cursor().execute(f"drop database {name}")
        for conn in opened:
            conn.close()


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, Callable[[], Any]]]:
    """A fresh PostgreSQL schema and a factory of connections with it first in the search_path."""
    require("postgres")
    name = f"dtmcli_t_{uuid.uuid4().hex[:10]}"
    admin = psycopg2_connect()
    admin.autocommit = True
    opened: list[Any] = [admin]

    def connect() -> Any:
        conn = psycopg2_connect()
        conn.cursor().execute(f"set search_path to {name}")
        conn.commit()
        opened.append(conn)
        return conn

    admin.cursor().execute(f"create schema {name}")
    try:
        yield name, connect
    finally:
        for conn in opened[1:]:
            conn.close()
        admin.cursor().execute(f"drop schema {name} cascade")
        admin.close()


def open_account(gid: str, initial: int = 0) -> None:
    """A row of the MariaDB balance table for ``gid``, holding ``initial``."""
    conn = mysql_connect()
    execute(conn, f"insert into {BALANCE_TABLE}(user_id, balance) values (%s, %s)", (gid, initial))
    conn.commit()
    conn.close()


def balance(gid: str) -> int:
    """The MariaDB balance of ``gid``."""
    conn = mysql_connect()
    try:
        return int(query_all(conn, f"select balance from {BALANCE_TABLE} where user_id = %s", (gid,))[0][0])
    finally:
        conn.close()
