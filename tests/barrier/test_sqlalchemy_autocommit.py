"""A SQLAlchemy connection or session in AUTOCOMMIT mode is refused before anything is written.

In AUTOCOMMIT mode ``begin()`` opens nothing on the database: the barrier row and every business
statement commit one by one, so a business function failing half-way would leave its first writes
and the barrier row committed, and DTM's retry would be skipped as a duplicate with the work half
done. Real MariaDB and PostgreSQL, blocking (PyMySQL, psycopg2, psycopg) and asyncio (aiomysql,
asyncpg, psycopg async), Connection and Session, with and without a transaction the caller opened.
The control cases run the same steps on the same engines without AUTOCOMMIT.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import EFFECT_TABLE
from services import MYSQL, POSTGRES, require
from test_managed import count_rows

from dtmcli import DtmInvalidInput, local_gid
from dtmcli.asyncio.barrier import BranchBarrier as AsyncBranchBarrier
from dtmcli.barrier import BranchBarrier

_PG = f"{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{POSTGRES['dbname']}"
_MY = f"{MYSQL['user']}@{MYSQL['host']}:{MYSQL['port']}/{MYSQL['database']}"
SYNC_URLS = {
    "pymysql": f"mysql+pymysql://{_MY}",
    "psycopg2": f"postgresql+psycopg2://{_PG}",
    "psycopg": f"postgresql+psycopg://{_PG}",
}
ASYNC_URLS = {
    "aiomysql": f"mysql+aiomysql://{_MY}",
    "asyncpg": f"postgresql+asyncpg://{_PG}",
    "psycopg_async": f"postgresql+psycopg_async://{_PG}",
}


SHAPES = pytest.mark.parametrize("shape", ["connection", "session", "connection_in_transaction"])
MODES = pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "control"])


def _ready(url: str) -> None:
    from conftest import _prepare

    service = "mysql" if url.startswith("mysql") else "postgres"
    require(service)
    _prepare(service)


def written(gid: str, url: str) -> tuple[int, int]:
    """(business rows, barrier rows) of ``gid``, read over a blocking driver of the same database."""
    import sqlalchemy

    blocking = {"+aiomysql": "+pymysql", "+asyncpg": "+psycopg2", "+psycopg_async": "+psycopg"}
    for flavour, other in blocking.items():
        url = url.replace(flavour, other)
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as c:
            effects = c.execute(sqlalchemy.text(f"select count(*) from {EFFECT_TABLE} where gid = :g"),
                                {"g": gid}).scalar_one()
        return int(effects), count_rows(engine, gid)
    finally:
        engine.dispose()


def expected(autocommit: bool) -> tuple[type[Exception], str, list[int]]:
    """(error, its message's pattern, business calls made): refused before the business function in
    AUTOCOMMIT mode; otherwise the business function's own error, after its one call."""
    return (DtmInvalidInput, "AUTOCOMMIT", []) if autocommit else (RuntimeError, "half-way", [1])


def _insert(gid: str) -> Any:
    import sqlalchemy

    return sqlalchemy.text(f"insert into {EFFECT_TABLE}(gid, op) values (:g, 'action')"), {"g": gid}


@SHAPES
@MODES
@pytest.mark.parametrize("driver", sorted(SYNC_URLS))
def test_blocking(driver: str, autocommit: bool, shape: str) -> None:
    import sqlalchemy
    from sqlalchemy.orm import Session

    url = SYNC_URLS[driver]
    _ready(url)
    engine = sqlalchemy.create_engine(url, **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}))
    gid = local_gid()
    called = []

    def busi(tx: Any) -> None:
        called.append(1)
        tx.execute(*_insert(gid))
        raise RuntimeError("the business failed half-way, after its first write")

    try:
        with engine.connect() as c:
            target: Any = Session(bind=c) if shape == "session" else c
            if shape == "connection_in_transaction":
                c.begin()
            error, match, calls = expected(autocommit)
            with pytest.raises(error, match=match):
                BranchBarrier("saga", gid, "01", "action").call(target, busi)
            assert called == calls
            # what the barrier opened is closed again; the caller's own transaction stays
            assert target.in_transaction() is (shape == "connection_in_transaction")
            if shape == "connection_in_transaction":
                c.rollback()
            assert c.execute(sqlalchemy.text("select 1")).scalar_one() == 1  # still usable
    finally:
        engine.dispose()
    assert written(gid, url) == (0, 0)


@SHAPES
@MODES
@pytest.mark.parametrize("driver", sorted(ASYNC_URLS))
def test_asyncio(driver: str, autocommit: bool, shape: str) -> None:
    url = ASYNC_URLS[driver]
    _ready(url)
    gid = local_gid()
    called = []

    async def busi(tx: Any) -> None:
        called.append(1)
        await tx.execute(*_insert(gid))
        raise RuntimeError("the business failed half-way, after its first write")

    async def main() -> None:
        import sqlalchemy
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        engine = create_async_engine(url, **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}))
        try:
            async with engine.connect() as c:
                target: Any = AsyncSession(bind=c) if shape == "session" else c
                if shape == "connection_in_transaction":
                    await c.begin()
                error, match, calls = expected(autocommit)
                with pytest.raises(error, match=match):
                    await AsyncBranchBarrier("saga", gid, "01", "action").call(target, busi)
                assert called == calls
                assert target.in_transaction() is (shape == "connection_in_transaction")
                if shape == "connection_in_transaction":
                    await c.rollback()
                assert (await c.execute(sqlalchemy.text("select 1"))).scalar_one() == 1
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert written(gid, url) == (0, 0)


@pytest.mark.parametrize("driver", sorted(SYNC_URLS))
def test_a_transactional_connection_after_autocommit_works(driver: str) -> None:
    """The fix the error names: the same engine, the connection switched to a transactional level."""
    import sqlalchemy

    url = SYNC_URLS[driver]
    _ready(url)
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    gid = local_gid()
    try:
        with engine.connect() as c:
            c = c.execution_options(isolation_level="READ COMMITTED")
            assert BranchBarrier("saga", gid, "01", "action").call(c, lambda tx: tx.execute(*_insert(gid))) is not None
            c.commit()
    finally:
        engine.dispose()
    assert written(gid, url) == (1, 1)
