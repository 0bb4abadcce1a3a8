"""``@barrier`` answers DTM itself, so it must own a transaction that is committed by then (review r2, M2).

Given a SQLAlchemy Session or Connection (``db_arg``, e.g. a FastAPI dependency) that something else
already used in the request, the barrier used to join that transaction through a SAVEPOINT, release
it, and answer 200 SUCCESS; the usual session dependency never commits, so the barrier rows and the
business work were rolled back when it closed, and DTM never called again. Now such a session is
refused (500, nothing runs), and a fresh one is owned and committed by the barrier. A direct
``BranchBarrier.call`` still joins (its caller commits), unless ``join_transaction=False``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, AsyncIterator

import pytest
from conftest import EFFECT_TABLE, _prepare, psycopg2_connect, query_all
from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient
from services import POSTGRES, require
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from dtmcli import DtmInvalidInput, local_gid
from dtmcli.asyncio.barrier import BranchBarrier as AsyncBarrier
from dtmcli.barrier import BranchBarrier, barrier
from dtmcli.contrib.fastapi import BranchDep, DtmRoute

REFUSED = "already has a transaction open"
PG = f"{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{POSTGRES['dbname']}"
INSERT = f"insert into {EFFECT_TABLE}(gid, op) values (:g, 'action')"


@pytest.fixture(autouse=True)
def _postgres() -> None:
    require("postgres")
    _prepare("postgres")


def q(gid: str) -> dict[str, str]:
    return {"gid": gid, "trans_type": "saga", "branch_id": "01", "op": "action"}


def committed(gid: str) -> tuple[int, int]:
    """(barrier rows, effect rows) committed for ``gid``."""
    conn = psycopg2_connect()
    try:
        rows = query_all(conn, "select count(*) from dtm_barrier.barrier where gid = %s", (gid,))[0][0]
        effects = query_all(conn, f"select count(*) from {EFFECT_TABLE} where gid = %s", (gid,))[0][0]
        return int(rows), int(effects)
    finally:
        conn.close()


def test_async_session_with_an_open_transaction_is_refused_by_the_decorator() -> None:
    @barrier(db_arg="session")
    async def trans_in(query: Any, info: Any, session: Any, tx: Any = None) -> None:
        await tx.execute(text(INSERT), {"g": info.gid})

    async def scenario() -> tuple[Any, Any, str, str]:
        engine = create_async_engine(f"postgresql+asyncpg://{PG}")
        try:
            used, fresh = local_gid(), local_gid()
            async with AsyncSession(engine) as session:
                await session.execute(text("select 1"))  # e.g. an auth dependency: autobegins
                refused = await trans_in(q(used), session=session)
            async with AsyncSession(engine) as session:  # closed without commit, like the usual dependency
                owned = await trans_in(q(fresh), session=session)
            return refused, owned, used, fresh
        finally:
            await engine.dispose()

    refused, owned, used, fresh = asyncio.run(scenario())
    assert refused.status == 500 and REFUSED in refused.body["message"]
    assert committed(used) == (0, 0)
    assert owned.status == 200 and committed(fresh) == (1, 1)  # the barrier's own transaction, committed


def test_sync_session_with_an_open_transaction_is_refused_by_the_decorator() -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    @barrier(db_arg="session")
    def trans_in(query: Any, info: Any, session: Any, tx: Any = None) -> None:
        tx.execute(text(INSERT), {"g": info.gid})

    engine = create_engine(f"postgresql+psycopg2://{PG}")
    try:
        used, fresh = local_gid(), local_gid()
        with Session(engine) as session:
            session.execute(text("select 1"))
            refused = trans_in(q(used), session=session)
        with Session(engine) as session:
            owned = trans_in(q(fresh), session=session)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
            refused_conn = trans_in(q(used), session=conn)
    finally:
        engine.dispose()
    assert refused.status == 500 and REFUSED in refused.body["message"]
    assert refused_conn.status == 500 and REFUSED in refused_conn.body["message"]
    assert committed(used) == (0, 0)
    assert owned.status == 200 and committed(fresh) == (1, 1)


def test_a_direct_call_still_joins_unless_told_not_to() -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(f"postgresql+psycopg2://{PG}")
    try:
        joined, refused = local_gid(), local_gid()
        with Session(engine) as session:
            session.execute(text("select 1"))
            BranchBarrier("saga", joined, "01", "action").call(
                session, lambda tx: tx.execute(text(INSERT), {"g": joined}))
            with pytest.raises(DtmInvalidInput, match=REFUSED):
                BranchBarrier("saga", refused, "01", "action").call(session, lambda tx: None, join_transaction=False)
            session.commit()  # the caller commits the joined work
    finally:
        engine.dispose()
    assert committed(joined) == (1, 1) and committed(refused) == (0, 0)

    async def scenario() -> None:
        aengine = create_async_engine(f"postgresql+asyncpg://{PG}")
        try:
            async with AsyncSession(aengine) as session:
                await session.execute(text("select 1"))
                with pytest.raises(DtmInvalidInput, match=REFUSED):
                    await AsyncBarrier("saga", local_gid(), "01", "action").call(session, lambda tx: None,
                                                                                 join_transaction=False)
        finally:
            await aengine.dispose()

    asyncio.run(scenario())


# -- FastAPI (module level: the routes' string annotations are resolved in this module) -----------------------------

_makers: list[async_sessionmaker[AsyncSession]] = []


async def get_session() -> AsyncIterator[AsyncSession]:
    async with _makers[-1]() as session:  # no commit: the common pattern
        yield session


async def current_user(session: Annotated[AsyncSession, Depends(get_session)]) -> str:
    await session.execute(text("select 1"))  # e.g. loads the caller's account: autobegins the transaction
    return "alice"


router = APIRouter(route_class=DtmRoute)


@router.post("/TransIn")
@barrier(db_arg="session")
async def trans_in_route(info: BranchDep, user: Annotated[str, Depends(current_user)],
                         session: Annotated[AsyncSession, Depends(get_session)], tx: Any = None) -> None:
    await tx.execute(text(INSERT), {"g": info.gid})


@router.post("/TransInFresh")
@barrier(db_arg="session")
async def trans_in_fresh_route(info: BranchDep, session: Annotated[AsyncSession, Depends(get_session)],
                               tx: Any = None) -> None:
    await tx.execute(text(INSERT), {"g": info.gid})


def test_fastapi_session_dependency_used_before_the_handler() -> None:
    """The reviewer's scenario: an auth dependency reads through the request's session first."""
    engine = create_async_engine(f"postgresql+asyncpg://{PG}", poolclass=NullPool)  # the test client's loop ends
    _makers.append(async_sessionmaker(engine))
    app = FastAPI()
    app.include_router(router)
    used, fresh = local_gid(), local_gid()
    with TestClient(app) as client:
        refused = client.post(f"/TransIn?gid={used}&trans_type=saga&branch_id=01&op=action")
        owned = client.post(f"/TransInFresh?gid={fresh}&trans_type=saga&branch_id=01&op=action")
    assert refused.status_code == 500 and REFUSED in refused.json()["message"]
    assert committed(used) == (0, 0)
    assert owned.status_code == 200 and committed(fresh) == (1, 1)
