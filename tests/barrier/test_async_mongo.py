"""The asyncio MongoDB barrier (**experimental**, pymongo's ``AsyncMongoClient``).

No MongoDB server is available where dtmcli is developed: the flow is checked on an in-memory async
fake (session-buffered writes, like a transaction), and against a real replica set only when
``DTM_TEST_MONGO_URL`` is set, like the blocking Mongo tests.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Optional

import pytest
from services import MONGO_URL
from test_mongo import FakeError, FakeResult

from dtmcli import DtmDuplicated, DtmFailure, DtmInvalidInput, local_gid
from dtmcli.asyncio.barrier import BranchBarrier, query_prepared_mongo
from dtmcli.barrier import BarrierConflict, BarrierDatabaseError, Decision


class AsyncFakeCollection:
    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []

    def _find(self, key: dict[str, str], extra: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        for doc in self.docs + extra:
            if all(doc.get(k) == v for k, v in key.items()):
                return doc
        return None

    async def update_one(self, key: dict[str, str], update: dict[str, Any], upsert: bool, session: Any) -> FakeResult:
        pending = session.pending if session is not None else []
        if session is not None and session.fail_with is not None:
            raise session.fail_with
        await asyncio.sleep(0)
        if self._find(key, pending) is not None:
            return FakeResult(None)
        (pending if session is not None else self.docs).append({**key, **update["$setOnInsert"]})
        return FakeResult(len(self.docs) + len(pending))

    async def find_one(self, key: dict[str, str]) -> Optional[dict[str, Any]]:
        return self._find(key, [])


class AsyncFakeSession:
    def __init__(self, coll: AsyncFakeCollection, fail_with: Optional[BaseException]) -> None:
        self.coll, self.pending, self.in_transaction, self.fail_with = coll, [], False, fail_with
        self.ended = False
        self.aborted = 0

    async def start_transaction(self) -> None:
        self.in_transaction = True

    async def commit_transaction(self) -> None:
        self.coll.docs += self.pending
        self.pending, self.in_transaction = [], False

    async def abort_transaction(self) -> None:
        await asyncio.sleep(0.01)
        self.pending, self.in_transaction = [], False
        self.aborted += 1

    async def end_session(self) -> None:
        self.ended = True


class AsyncFakeClient:
    def __init__(self) -> None:
        self.coll = AsyncFakeCollection()
        self.fail_with: Optional[BaseException] = None
        self.sessions: list[AsyncFakeSession] = []

    def __getitem__(self, name: str) -> Any:
        return {"barrier": self.coll}

    def start_session(self) -> AsyncFakeSession:  # not a coroutine in pymongo's async API either
        self.sessions.append(AsyncFakeSession(self.coll, self.fail_with))
        return self.sessions[-1]


def test_every_order_on_the_fake() -> None:
    async def body() -> None:
        for seq in itertools.product(("try", "cancel"), repeat=3):
            client, gid, ran = AsyncFakeClient(), local_gid(), []
            for op in seq:
                async def busi(session: Any, op: str = op, ran: list[str] = ran) -> None:
                    ran.append(op)

                await BranchBarrier("tcc", gid, "01", op).mongo_call(client, busi)
            expected = ["try", "cancel"] if seq[0] == "try" and "cancel" in seq else (
                ["try"] if seq[0] == "try" else [])
            assert ran == expected, seq
            assert all(s.ended for s in client.sessions)

    asyncio.run(body())


def test_null_compensation_business_error_and_msg() -> None:
    async def body() -> None:
        client, gid = AsyncFakeClient(), local_gid()
        bb = BranchBarrier("saga", gid, "01", "compensate")
        assert await bb.mongo_call(client, lambda s: pytest.fail("must not run")) is None
        assert bb.last_decision is Decision.NULL_COMPENSATION
        assert sorted((d["op"], d["reason"]) for d in client.coll.docs) == [
            ("action", "compensate"), ("compensate", "compensate")]

        async def failing(session: Any) -> None:
            raise ValueError("no")

        other = local_gid()
        with pytest.raises(ValueError):
            await BranchBarrier("saga", other, "01", "action").mongo_call(client, failing)
        assert not [d for d in client.coll.docs if d["gid"] == other]

        await BranchBarrier.for_msg(other).mongo_call(client, lambda s: None)
        with pytest.raises(DtmDuplicated):
            await BranchBarrier.for_msg(other).mongo_call(client, lambda s: None)
        await query_prepared_mongo(other, client)
        with pytest.raises(DtmFailure):
            await query_prepared_mongo(local_gid(), client)

    asyncio.run(body())


def test_store_errors_are_mapped_like_the_blocking_barrier() -> None:
    async def body() -> None:
        client = AsyncFakeClient()
        client.fail_with = FakeError("Transaction numbers are only allowed on a replica set member or mongos", 20)
        with pytest.raises(BarrierDatabaseError, match="replica set"):
            await BranchBarrier("saga", local_gid(), "01", "action").mongo_call(client, lambda s: None)
        client.fail_with = FakeError("WriteConflict", 112, {"TransientTransactionError"})
        with pytest.raises(BarrierConflict):
            await BranchBarrier("saga", local_gid(), "01", "action").mongo_call(client, lambda s: None)
        assert all(s.ended for s in client.sessions)

    asyncio.run(body())


def test_cancelled_call_aborts_the_transaction() -> None:
    async def body() -> None:
        client, gid = AsyncFakeClient(), local_gid()
        busy = asyncio.Event()

        async def busi(session: Any) -> None:
            busy.set()
            await asyncio.Event().wait()

        task = asyncio.ensure_future(BranchBarrier("saga", gid, "01", "action").mongo_call(client, busi))
        await busy.wait()
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # again, while aborting: the abort still finishes
        with pytest.raises(asyncio.CancelledError):
            await task
        session = client.sessions[-1]
        assert session.aborted == 1 and not session.in_transaction and session.ended
        assert client.coll.docs == []
        assert await BranchBarrier("saga", gid, "01", "action").mongo_call(client, lambda s: "ran") == "ran"

    asyncio.run(body())


def test_blocking_and_async_clients_are_not_mixed_up() -> None:
    import pymongo

    async def body() -> None:
        sync = pymongo.MongoClient("mongodb://127.0.0.1:1", connect=False, serverSelectionTimeoutMS=100)
        try:
            with pytest.raises(DtmInvalidInput, match="blocking client"):
                await BranchBarrier("saga", local_gid(), "01", "action").mongo_call(sync, lambda s: None)
            with pytest.raises(DtmInvalidInput, match="blocking client"):
                await query_prepared_mongo(local_gid(), sync)
        finally:
            sync.close()
        aclient = pymongo.AsyncMongoClient("mongodb://127.0.0.1:1", connect=False, serverSelectionTimeoutMS=100)
        try:
            from dtmcli.barrier import BranchBarrier as SyncBarrier
            from dtmcli.barrier import query_prepared_mongo as sync_query_prepared_mongo

            with pytest.raises(DtmInvalidInput, match="asyncio client"):
                SyncBarrier("saga", local_gid(), "01", "action").mongo_call(aclient, lambda s: None)
            with pytest.raises(DtmInvalidInput, match="asyncio client"):
                sync_query_prepared_mongo(local_gid(), aclient)
        finally:
            await aclient.close()

    asyncio.run(body())


@pytest.mark.skipif(MONGO_URL is None, reason="DTM_TEST_MONGO_URL is not set (needs a replica set)")
def test_real_server_orders_and_query_prepared() -> None:
    import pymongo

    from dtmcli.barrier import create_mongo_schema

    sync: Any = pymongo.MongoClient(MONGO_URL)
    create_mongo_schema(sync)
    sync.close()

    async def body() -> None:
        client: Any = pymongo.AsyncMongoClient(MONGO_URL)
        try:
            accounts = client["dtmcli_test"]["accounts"]
            for seq in itertools.product(("action", "compensate"), repeat=3):
                gid = local_gid()
                await accounts.insert_one({"_id": gid, "balance": 100})
                for op in seq:
                    delta = -10 if op == "action" else 10

                    async def busi(s: Any, d: int = delta, g: str = gid) -> None:
                        await accounts.update_one({"_id": g}, {"$inc": {"balance": d}}, session=s)

                    await BranchBarrier("saga", gid, "01", op).mongo_call(client, busi)
                expected = 90 if seq[0] == "action" and "compensate" not in seq else 100
                assert (await accounts.find_one({"_id": gid}))["balance"] == expected, seq
            gid = local_gid()
            with pytest.raises(DtmFailure):
                await query_prepared_mongo(gid, client)
            with pytest.raises(DtmDuplicated):
                await BranchBarrier.for_msg(gid).mongo_call(client, lambda s: None)
        finally:
            await client.close()

    asyncio.run(body())
