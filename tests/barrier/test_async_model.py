"""The property-based barrier model test (test_barrier_model.py) against the asyncio barrier.

The same legal delivery histories, the same abstract model and the same check; only the deliveries
differ: each goes through :mod:`dtmcli.asyncio.barrier` on an async driver (aiomysql on MariaDB,
asyncpg / psycopg async / SQLAlchemy async on PostgreSQL and MariaDB, ``redis.asyncio``), and a
group of concurrent deliveries is sent with ``asyncio.gather`` on one connection each.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterator, Optional

import pytest
from conftest import _prepare
from hypothesis import given
from hypothesis import strategies as st
from services import REDIS, require
from test_async_sql import ADRIVERS, ASERVICE, Driver
from test_barrier_model import (
    _SETTINGS,
    BRANCH,
    EFFECT_TABLE,
    MAX_GROUP,
    QUERY,
    BusiFailed,
    Delivery,
    Step,
    histories,
    matches_model,
    model,
)

from dtmcli import BarrierConflict, DtmDuplicated, DtmFailure, local_gid
from dtmcli.asyncio.barrier import BranchBarrier, query_prepared, query_prepared_redis
from dtmcli.barrier import Decision


class Loop:
    """One event loop for a test module: the stores' connections live across Hypothesis examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.close()


class AsyncStore:
    async def deliver(self, slot: int, trans_type: str, gid: str, d: Delivery) -> str:
        raise NotImplementedError

    def effects(self, gid: str, ops: list[str]) -> dict[str, int]:
        raise NotImplementedError

    def prepare(self, gid: str, ops: list[str]) -> None:
        """Set up a fresh gid (Redis counters)."""

    async def aclose(self) -> None:
        raise NotImplementedError


class AsyncSqlStore(AsyncStore):
    def __init__(self, loop: Loop, driver: str) -> None:
        require(ASERVICE[driver])
        _prepare(ASERVICE[driver])
        self.d = Driver(driver)
        self.conns = [loop.run(self.d.connect()) for _ in range(MAX_GROUP + 1)]
        self.sync = self.d.sync()
        cur = self.sync.cursor()
        cur.execute(f"create table if not exists {EFFECT_TABLE} (gid varchar(128) not null, op varchar(45) not null)")
        cur.close()
        self.sync.commit()

    async def deliver(self, slot: int, trans_type: str, gid: str, d: Delivery) -> str:
        conn = self.conns[slot]
        if d.op == QUERY:
            try:
                await query_prepared(gid, conn)
                return "ok"
            except DtmFailure:
                return "rolled_back"

        async def busi(tx: Any) -> str:
            await self.d.run(tx, f"insert into {EFFECT_TABLE} (gid, op) values (%s, %s)", (gid, d.op))
            if d.fail:
                raise BusiFailed(d.op)
            return "ran"

        try:
            result = await BranchBarrier(trans_type, gid, BRANCH[trans_type], d.op).call(conn, busi)
        except DtmDuplicated:
            return "duplicated"
        except BusiFailed:
            return "error"
        return "run" if result == "ran" else "skip"

    def effects(self, gid: str, ops: list[str]) -> dict[str, int]:
        cur = self.sync.cursor()
        cur.execute(f"select op, count(*) from {EFFECT_TABLE} where gid = %s group by op", (gid,))
        counts = {str(op): int(n) for op, n in cur.fetchall()}
        cur.close()
        self.sync.rollback()
        return {op: counts.get(op, 0) for op in ops}

    async def aclose(self) -> None:
        self.sync.close()
        await self.d.aclose()


class AsyncRedisStore(AsyncStore):
    """As test_barrier_model.RedisStore: each op adds 1 to its own counter; a failing one subtracts too much."""

    SHORT = -(10**9)

    def __init__(self, loop: Loop) -> None:
        require("redis")
        import redis
        import redis.asyncio

        self.clients = [redis.asyncio.Redis(host=REDIS["host"], port=REDIS["port"]) for _ in range(MAX_GROUP + 1)]
        self.sync = redis.Redis(host=REDIS["host"], port=REDIS["port"])
        self.layout = "go"

    @staticmethod
    def key(gid: str, op: str) -> str:
        return f"{{dtmcli-model-{gid}}}:{op}"

    def prepare(self, gid: str, ops: list[str]) -> None:
        for op in ops:
            self.sync.set(self.key(gid, op), 0, ex=600)

    async def deliver(self, slot: int, trans_type: str, gid: str, d: Delivery) -> str:
        client = self.clients[slot]
        if d.op == QUERY:
            try:
                await query_prepared_redis(gid, client, layout=self.layout, key=self.key(gid, "msg"))
                return "ok"
            except DtmFailure:
                return "rolled_back"
        bb = BranchBarrier(trans_type, gid, BRANCH[trans_type], d.op)
        try:
            decision = await bb.redis_check_adjust_amount(client, self.key(gid, d.op), self.SHORT if d.fail else 1,
                                                          layout=self.layout)
        except DtmDuplicated:
            return "duplicated"
        except DtmFailure:
            return "error"
        return "run" if decision is Decision.RUN else "skip"

    def effects(self, gid: str, ops: list[str]) -> dict[str, int]:
        return {op: int(self.sync.get(self.key(gid, op)) or 0) for op in ops}

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        self.sync.close()


async def deliver_group(store: AsyncStore, trans_type: str, gid: str, step: Step) -> list[Optional[str]]:
    """Deliver a step's deliveries at once (asyncio.gather); ``None`` for one refused as a conflict (425)."""

    async def one(i: int, d: Delivery) -> Optional[str]:
        try:
            return await store.deliver(i, trans_type, gid, d)
        except BarrierConflict:
            return None  # DTM delivers it again later

    return list(await asyncio.gather(*(one(i, d) for i, d in enumerate(step))))


async def run_history(store: AsyncStore, trans_type: str, steps: list[Step]
                      ) -> tuple[list[list[tuple[Delivery, str]]], str]:
    gid = local_gid()
    store.prepare(gid, [*{d.op for step in steps for d in step if d.op != QUERY}])
    done: list[list[tuple[Delivery, str]]] = []
    for step in steps:
        answers = await deliver_group(store, trans_type, gid, step)
        done.append([(d, a) for d, a in zip(step, answers) if a is not None])
        for d, a in zip(step, answers):
            if a is None:
                done.append([(d, await store.deliver(0, trans_type, gid, d))])
    return [s for s in done if s], gid


def check(loop: Loop, store: AsyncStore, trans_type: str, steps: list[Step]) -> None:
    done, gid = loop.run(run_history(store, trans_type, steps))
    ops = sorted({d.op for step in steps for d in step if d.op != QUERY})
    effects = store.effects(gid, ops)
    assert matches_model(trans_type, done, effects), (
        f"{trans_type} gid={gid}: answers {[[(d.op, d.fail, a) for d, a in s] for s in done]}, effects {effects}; "
        f"model for the serial order: {model(trans_type, [d for s in done for d, _ in s])}"
    )


@pytest.fixture(scope="module")
def stores() -> Iterator[tuple[Loop, dict[str, AsyncStore]]]:
    loop = Loop()
    opened: dict[str, AsyncStore] = {}
    yield loop, opened
    for store in opened.values():
        loop.run(store.aclose())
    loop.close()


def _store(stores: tuple[Loop, dict[str, AsyncStore]], name: str, make: Callable[[Loop], AsyncStore]) -> AsyncStore:
    loop, opened = stores
    if name not in opened:
        opened[name] = make(loop)
    return opened[name]


@pytest.mark.parametrize("driver", ADRIVERS)
@_SETTINGS
@given(history=histories(can_fail=True))
def test_async_sql_barrier_matches_the_model(
    stores: tuple[Loop, dict[str, AsyncStore]], driver: str, history: tuple[str, list[Step]]
) -> None:
    check(stores[0], _store(stores, driver, lambda loop: AsyncSqlStore(loop, driver)), *history)


@_SETTINGS
@given(history=histories(can_fail=True), layout=st.sampled_from(["go", "cluster"]))
def test_async_redis_barrier_matches_the_model(
    stores: tuple[Loop, dict[str, AsyncStore]], history: tuple[str, list[Step]], layout: str
) -> None:
    store = _store(stores, "redis", AsyncRedisStore)
    assert isinstance(store, AsyncRedisStore)
    store.layout = layout
    check(stores[0], store, *history)
