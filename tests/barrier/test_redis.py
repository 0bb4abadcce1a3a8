"""Redis barrier on a real Redis server: every order with duplicates, races, NOSCRIPT, layouts."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest

from dtmcli import DtmDuplicated, DtmFailure, DtmInvalidInput, local_gid
from dtmcli._barrier import redis as barrier_redis
from dtmcli.barrier import BranchBarrier, Decision, query_prepared_redis

START = 100
DELTA = {"action": -30, "compensate": 30, "try": -30, "cancel": 30, "confirm": 0}


def adjust(client: Any, trans_type: str, gid: str, op: str, key: str, **kw: Any) -> Decision:
    return BranchBarrier(trans_type, gid, "01", op).redis_check_adjust_amount(client, key, DELTA[op], **kw)


@pytest.mark.parametrize(
    "trans_type,ops", [("saga", ("action", "compensate")), ("tcc", ("try", "cancel"))]
)
def test_every_order_with_duplicates(redis_client: Any, trans_type: str, ops: tuple[str, str]) -> None:
    forward, compensation = ops
    for seq in itertools.product(ops, repeat=3):
        gid = local_gid()
        key = f"dtmcli-test-balance-{gid}"
        redis_client.set(key, START)
        applied = []
        for op in seq:
            if adjust(redis_client, trans_type, gid, op, key) is Decision.RUN:
                applied.append(op)
        # the forward op applies only when it came first; the compensation only after it
        expected = [forward, compensation] if seq[0] == forward and compensation in seq else (
            [forward] if seq[0] == forward else [])
        assert applied == expected, seq
        assert int(redis_client.get(key)) == START + sum(DELTA[op] for op in expected), seq


def test_keys_and_values_match_the_go_layout(redis_client: Any) -> None:
    gid = local_gid()
    key = f"dtmcli-test-balance-{gid}"
    redis_client.set(key, START)
    assert adjust(redis_client, "tcc", gid, "cancel", key, expire=120) is Decision.NULL_COMPENSATION
    assert redis_client.get(f"{gid}-01-cancel-01") == b"op"
    assert redis_client.get(f"{gid}-01-try-01") == b"rollback"
    assert 0 < redis_client.ttl(f"{gid}-01-try-01") <= 120
    assert adjust(redis_client, "tcc", gid, "try", key) is Decision.DUPLICATE  # suspended
    assert int(redis_client.get(key)) == START


def test_balance_check_comes_first(redis_client: Any) -> None:
    gid = local_gid()
    key = f"dtmcli-test-balance-{gid}"
    redis_client.set(key, 10)
    with pytest.raises(DtmFailure):
        adjust(redis_client, "saga", gid, "action", key)
    assert int(redis_client.get(key)) == 10
    assert redis_client.exists(f"{gid}-01-action-01") == 0
    with pytest.raises(DtmFailure):
        adjust(redis_client, "saga", gid, "action", f"missing-{gid}")


def test_msg_duplicate_and_query_prepared(redis_client: Any) -> None:
    gid = local_gid()
    key = f"dtmcli-test-balance-{gid}"
    redis_client.set(key, START)
    bb = BranchBarrier.for_msg(gid)
    assert bb.redis_check_adjust_amount(redis_client, key, 5) is Decision.RUN
    with pytest.raises(DtmDuplicated):
        BranchBarrier.for_msg(gid).redis_check_adjust_amount(redis_client, key, 5)
    query_prepared_redis(gid, redis_client)  # committed: success
    assert int(redis_client.get(key)) == START + 5

    late = local_gid()
    with pytest.raises(DtmFailure):
        query_prepared_redis({"trans_type": "msg", "gid": late, "branch_id": "00", "op": "msg"}, redis_client)
    assert redis_client.get(f"{late}-00-msg-01") == b"rollback"
    with pytest.raises(DtmDuplicated):
        BranchBarrier.for_msg(late).redis_check_adjust_amount(redis_client, key, 5)
    assert int(redis_client.get(key)) == START + 5


def test_script_is_reloaded_after_flush(redis_client: Any) -> None:
    redis_client.script_flush()
    gid = local_gid()
    key = f"dtmcli-test-balance-{gid}"
    redis_client.set(key, START)
    assert adjust(redis_client, "saga", gid, "action", key) is Decision.RUN
    assert redis_client.script_exists(barrier_redis.ADJUST_SCRIPT.sha) == [True]


def test_cluster_layout_shares_the_business_key_slot(redis_client: Any) -> None:
    gid = local_gid()
    key = f"{{acct-{gid}}}:balance"
    redis_client.set(key, START)
    assert adjust(redis_client, "saga", gid, "compensate", key, layout="cluster") is Decision.NULL_COMPENSATION
    tag = f"acct-{gid}"
    assert redis_client.get(f"{{{tag}}}{gid}-01-action-01") == b"rollback"
    assert barrier_redis.hash_tag(key) == tag
    assert barrier_redis.hash_tag("plain") == "plain"
    assert barrier_redis.hash_tag("a{}b{c}") == "a{}b{c}"
    with pytest.raises(DtmInvalidInput):
        adjust(redis_client, "saga", gid, "action", key, layout="sharded")
    with pytest.raises(DtmInvalidInput):
        adjust(redis_client, "saga", gid, "action", key, expire=0)


def test_raced_action_and_compensate(redis_client: Any) -> None:
    import redis

    for _round in range(5):
        gid = local_gid()
        key = f"dtmcli-test-balance-{gid}"
        redis_client.set(key, START)
        ops = ["action", "compensate"] * 4
        start = threading.Barrier(len(ops))
        decisions: list[Decision] = []
        lock = threading.Lock()

        def worker(op: str, gid: str = gid, key: str = key, start: threading.Barrier = start,
                   decisions: list[Decision] = decisions, lock: threading.Lock = lock) -> None:
            client = redis.Redis(host=redis_client.connection_pool.connection_kwargs["host"])
            start.wait()
            d = adjust(client, "saga", gid, op, key)
            with lock:
                decisions.append(d)
            client.close()

        threads = [threading.Thread(target=worker, args=(op,)) for op in ops]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(decisions) == len(ops)
        assert decisions.count(Decision.RUN) in (0, 2)
        assert int(redis_client.get(key)) == START
