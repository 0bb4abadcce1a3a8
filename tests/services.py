"""Reaching the real services tests use (MariaDB, PostgreSQL, Redis, MongoDB).

A test that needs a service calls ``require(name)``: it returns connection settings, or skips the
test when the service is unreachable -- except under ``CI=true``, where an unreachable service
fails the test instead (CI must never go green by skipping).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

import pytest

MYSQL = {"host": os.environ.get("DTM_TEST_MYSQL_HOST", "127.0.0.1"), "port": 3306, "user": "root", "password": "",
         "database": "test"}
POSTGRES = {"host": os.environ.get("DTM_TEST_PG_HOST", "127.0.0.1"), "port": 5432, "user": "postgres",
            "dbname": "test"}
REDIS = {"host": os.environ.get("DTM_TEST_REDIS_HOST", "127.0.0.1"), "port": 6379}
MONGO_URL: Optional[str] = os.environ.get("DTM_TEST_MONGO_URL") or None

_PORTS = {"mysql": (MYSQL["host"], 3306), "postgres": (POSTGRES["host"], 5432), "redis": (REDIS["host"], 6379)}


def mysql_connect() -> Any:
    """A PyMySQL connection to the test MariaDB database (autocommit off)."""
    import pymysql

    return pymysql.connect(
        host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"], password=MYSQL["password"],
        database=MYSQL["database"], autocommit=False,
    )


def psycopg2_connect() -> Any:
    """A psycopg2 connection to the test PostgreSQL database."""
    import psycopg2

    return psycopg2.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                            dbname=POSTGRES["dbname"])


def psycopg_connect() -> Any:
    """A psycopg 3 connection to the test PostgreSQL database."""
    import psycopg

    return psycopg.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                           dbname=POSTGRES["dbname"])


def in_ci() -> bool:
    """True when running under CI (``CI=true``)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require(name: str) -> None:
    """Skip (or under CI, fail) the calling test unless service ``name`` answers on its port."""
    host, port = _PORTS[name]
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if in_ci():
        pytest.fail(message + " (CI=true: services are required)")
    pytest.skip(message)
