"""What ``@barrier`` refuses when decorating rather than as a 500 on every call (review r2, m6, m9).

m6: aiopg, asyncmy, aiosqlite and motor are async databases, so an ``async def`` handler accepted
them, yet the asyncio barrier has no adapter for them (and motor's API differs from pymongo's async
one): every call answered 500. They are refused when decorating; motor is refused by the MongoDB
barrier itself too. m9: a bad ``table`` is refused when decorating (and when making a
query_prepared view), not per call.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from dtmcli import DtmInvalidInput
from dtmcli._barrier.mongo import check_client
from dtmcli.barrier import barrier


def _fake(module: str, name: str, **attrs: Any) -> Any:
    """An instance of a class that claims to come from ``module`` (only the class's module and name are read)."""
    cls = type(name, (), dict(attrs))
    cls.__module__ = module
    return cls()


async def async_handler(query: Any, info: Any, tx: Any = None) -> None:
    raise AssertionError("never runs")


def sync_handler(query: Any, info: Any, tx: Any = None) -> None:
    raise AssertionError("never runs")


def _acquire(self: Any) -> None:
    raise AssertionError("never called")


UNSUPPORTED = [
    _fake("aiopg.pool", "Pool", acquire=_acquire),
    _fake("asyncmy.pool", "Pool", acquire=_acquire),
    _fake("aiosqlite.core", "Connection", cursor=_acquire),
    _fake("motor.motor_asyncio", "AsyncIOMotorClient"),
]


@pytest.mark.parametrize("db", UNSUPPORTED, ids=lambda db: type(db).__module__.split(".")[0])
def test_async_databases_without_an_adapter_are_refused_when_decorating(db: Any) -> None:
    """Before: accepted, then every call answered 500 ("the asyncio barrier cannot use a aiopg.pool.Pool")."""
    with pytest.raises(DtmInvalidInput, match="the asyncio sql barrier cannot use"):
        barrier(db=db)(async_handler)
    with pytest.raises(DtmInvalidInput, match="the asyncio sql barrier cannot use"):
        barrier(db=db.acquire if hasattr(db, "acquire") else db)(async_handler)  # a pool's method: its pool's


def test_motor_is_refused_for_the_mongo_backend() -> None:
    """Before: motor was named in the docstring and accepted; start_session() was never awaited."""
    motor = _fake("motor.motor_asyncio", "AsyncIOMotorClient")
    with pytest.raises(DtmInvalidInput, match="the asyncio mongo barrier cannot use"):
        barrier(db=motor, backend="mongo")(async_handler)
    with pytest.raises(DtmInvalidInput, match="motor is not supported"):
        check_client(motor, asyncio=True)


def test_motor_through_db_arg_is_refused_at_the_call() -> None:
    motor = _fake("motor.motor_asyncio", "AsyncIOMotorClient")

    @barrier(db_arg="client", backend="mongo")
    async def handler(query: Any, info: Any, client: Any, tx: Any = None) -> None:
        raise AssertionError("never runs")

    answer = asyncio.run(handler({"gid": "g1", "trans_type": "saga", "branch_id": "01", "op": "action"},
                                 client=motor))
    assert answer.status == 500 and "motor is not supported" in answer.body["message"]


def test_supported_async_databases_are_accepted() -> None:
    import asyncpg
    from pymongo import AsyncMongoClient
    from sqlalchemy.ext.asyncio import create_async_engine

    barrier(db=create_async_engine("postgresql+asyncpg://u@127.0.0.1/db"))(async_handler)
    barrier(db=functools.partial(asyncpg.connect, "postgresql://u@127.0.0.1/db"))(async_handler)
    client = AsyncMongoClient("mongodb://127.0.0.1:1", connect=False)
    barrier(db=client, backend="mongo")(async_handler)


BAD_TABLES = ["x;drop table y", "a.b.c", "", "1abc", "t" * 49]


@pytest.mark.parametrize("table", BAD_TABLES)
def test_a_bad_table_is_refused_when_decorating(table: str) -> None:
    """Before: decorated fine, then every call answered 500."""
    import pymysql

    async def factory() -> Any:
        raise AssertionError("never called")

    with pytest.raises(DtmInvalidInput, match="barrier table name"):
        barrier(db=pymysql.connect, table=table)(sync_handler)
    with pytest.raises(DtmInvalidInput, match="barrier table name"):
        barrier(db=factory, table=table)(async_handler)
    with pytest.raises(DtmInvalidInput, match="barrier table name"):
        barrier(db_arg="conn", table=table)


@pytest.mark.parametrize("table", BAD_TABLES[:2])
def test_a_bad_table_is_refused_when_making_a_query_prepared_view(table: str) -> None:
    import pymysql

    from dtmcli.contrib.flask import query_prepared_view
    from dtmcli.contrib.starlette import query_prepared_endpoint

    with pytest.raises(DtmInvalidInput, match="barrier table name"):
        query_prepared_endpoint(pymysql.connect, table=table)
    with pytest.raises(DtmInvalidInput, match="barrier table name"):
        query_prepared_view(pymysql.connect, table=table)
