"""MongoDB barrier: the shared decision logic, the call flow on an in-memory fake, and a real server
when ``DTM_TEST_MONGO_URL`` points at a replica set."""

from __future__ import annotations

import itertools
from typing import Any, Optional

import pytest
from services import MONGO_URL

from dtmcli import DtmDuplicated, DtmFailure, local_gid
from dtmcli._barrier.core import Decision, decide
from dtmcli.barrier import BarrierConflict, BarrierDatabaseError, BranchBarrier, query_prepared_mongo


@pytest.mark.parametrize("op,origin,current,expected", [
    ("action", 0, 1, Decision.RUN),
    ("action", 0, 0, Decision.DUPLICATE),
    ("try", 0, 0, Decision.DUPLICATE),  # suspended try: its row was taken by the cancel
    ("cancel", 1, 1, Decision.NULL_COMPENSATION),
    ("compensate", 1, 1, Decision.NULL_COMPENSATION),
    ("rollback", 1, 1, Decision.NULL_COMPENSATION),
    ("cancel", 0, 1, Decision.RUN),
    ("cancel", 0, 0, Decision.DUPLICATE),
    ("msg", 0, 0, Decision.MSG_DUPLICATED),
    ("msg", 0, 1, Decision.RUN),
    ("confirm", 0, 1, Decision.RUN),
])
def test_decide(op: str, origin: int, current: int, expected: Decision) -> None:
    assert decide(op, origin, current) is expected
    assert expected.commits is (expected is not Decision.MSG_DUPLICATED)


class FakeError(Exception):
    def __init__(self, message: str, code: int, labels: Optional[set[str]] = None) -> None:
        super().__init__(message)
        self.code = code
        self._error_labels = labels or set()


class FakeResult:
    def __init__(self, upserted_id: Any) -> None:
        self.upserted_id = upserted_id


class FakeCollection:
    """update_one(upsert) / find_one with session-buffered writes, like a transaction."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []

    def _find(self, key: dict[str, str], extra: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        for doc in self.docs + extra:
            if all(doc.get(k) == v for k, v in key.items()):
                return doc
        return None

    def update_one(self, key: dict[str, str], update: dict[str, Any], upsert: bool, session: Any) -> FakeResult:
        pending = session.pending if session is not None else []
        if session is not None and session.fail_with is not None:
            raise session.fail_with
        if self._find(key, pending) is not None:
            return FakeResult(None)
        doc = {**key, **update["$setOnInsert"]}
        (pending if session is not None else self.docs).append(doc)
        return FakeResult(len(self.docs) + len(pending))

    def find_one(self, key: dict[str, str]) -> Optional[dict[str, Any]]:
        return self._find(key, [])


class FakeSession:
    def __init__(self, coll: FakeCollection, fail_with: Optional[BaseException]) -> None:
        self.coll, self.pending, self.in_transaction, self.fail_with = coll, [], False, fail_with
        self.ended = False

    def start_transaction(self) -> None:
        self.in_transaction = True

    def commit_transaction(self) -> None:
        self.coll.docs += self.pending
        self.pending, self.in_transaction = [], False

    def abort_transaction(self) -> None:
        self.pending, self.in_transaction = [], False

    def end_session(self) -> None:
        self.ended = True


class FakeClient:
    def __init__(self) -> None:
        self.coll = FakeCollection()
        self.fail_with: Optional[BaseException] = None
        self.sessions: list[FakeSession] = []

    def __getitem__(self, name: str) -> Any:
        return {"barrier": self.coll}

    def start_session(self) -> FakeSession:
        self.sessions.append(FakeSession(self.coll, self.fail_with))
        return self.sessions[-1]


def test_every_order_on_the_fake() -> None:
    for seq in itertools.product(("try", "cancel"), repeat=3):
        client, gid, ran = FakeClient(), local_gid(), []
        for op in seq:
            BranchBarrier("tcc", gid, "01", op).mongo_call(client, lambda s, op=op, ran=ran: ran.append(op))
        expected = ["try", "cancel"] if seq[0] == "try" and "cancel" in seq else (["try"] if seq[0] == "try" else [])
        assert ran == expected, seq
        assert all(s.ended for s in client.sessions)


def test_null_compensation_commits_both_documents() -> None:
    client, gid = FakeClient(), local_gid()
    bb = BranchBarrier("saga", gid, "01", "compensate")
    assert bb.mongo_call(client, lambda s: pytest.fail("must not run")) is None
    assert bb.last_decision is Decision.NULL_COMPENSATION
    assert sorted((d["op"], d["reason"], d["barrier_id"]) for d in client.coll.docs) == [
        ("action", "compensate", "01"), ("compensate", "compensate", "01")]


def test_business_error_aborts() -> None:
    client, gid = FakeClient(), local_gid()

    def failing(session: Any) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        BranchBarrier("saga", gid, "01", "action").mongo_call(client, failing)
    assert client.coll.docs == []


def test_msg_duplicate_and_query_prepared_on_fake() -> None:
    client, gid = FakeClient(), local_gid()
    BranchBarrier.for_msg(gid).mongo_call(client, lambda s: None)
    with pytest.raises(DtmDuplicated):
        BranchBarrier.for_msg(gid).mongo_call(client, lambda s: None)
    query_prepared_mongo(gid, client)
    late = local_gid()
    with pytest.raises(DtmFailure):
        query_prepared_mongo(late, client)


def test_missing_replica_set_is_reported() -> None:
    client = FakeClient()
    client.fail_with = FakeError("Transaction numbers are only allowed on a replica set member or mongos", 20)
    with pytest.raises(BarrierDatabaseError, match="replica set"):
        BranchBarrier("saga", local_gid(), "01", "action").mongo_call(client, lambda s: None)


def test_write_conflict_is_retryable() -> None:
    client = FakeClient()
    client.fail_with = FakeError("WriteConflict", 112, {"TransientTransactionError"})
    with pytest.raises(BarrierConflict):
        BranchBarrier("saga", local_gid(), "01", "action").mongo_call(client, lambda s: None)


def test_start_transaction_failure_is_an_error() -> None:
    class Broken(FakeClient):
        def start_session(self) -> FakeSession:
            session = super().start_session()

            def fail() -> None:
                raise FakeError("cannot start", 263)

            session.start_transaction = fail  # type: ignore[method-assign]
            return session

    with pytest.raises(BarrierDatabaseError, match="start transaction"):
        BranchBarrier("saga", local_gid(), "01", "action").mongo_call(Broken(), lambda s: "ran")


@pytest.mark.skipif(MONGO_URL is None, reason="DTM_TEST_MONGO_URL is not set (needs a replica set)")
def test_real_server_orders_and_query_prepared() -> None:
    import pymongo

    from dtmcli.barrier import create_mongo_schema

    client: Any = pymongo.MongoClient(MONGO_URL)
    try:
        create_mongo_schema(client)
        create_mongo_schema(client)
        accounts = client["dtmcli_test"]["accounts"]
        for seq in itertools.product(("action", "compensate"), repeat=3):
            gid = local_gid()
            accounts.insert_one({"_id": gid, "balance": 100})
            for op in seq:
                delta = -10 if op == "action" else 10
                BranchBarrier("saga", gid, "01", op).mongo_call(
                    client, lambda s, d=delta, g=gid: accounts.update_one({"_id": g}, {"$inc": {"balance": d}},
                                                                       session=s))
            expected = 90 if seq[0] == "action" and "compensate" not in seq else 100
            assert accounts.find_one({"_id": gid})["balance"] == expected, seq
        gid = local_gid()
        with pytest.raises(DtmFailure):
            query_prepared_mongo(gid, client)
        with pytest.raises(DtmDuplicated):
            BranchBarrier.for_msg(gid).mongo_call(client, lambda s: None)
    finally:
        client.close()
