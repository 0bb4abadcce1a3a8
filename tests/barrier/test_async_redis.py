"""The asyncio Redis barrier on a real Redis server (``redis.asyncio``): the scenarios of test_redis.py.

Same Lua scripts, keys and answers as the blocking barrier; the blocking client reads the results, so
both flavours are seen to write the very same keys. Concurrent deliveries use ``asyncio.gather``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Awaitable, Callable

import pytest
from services import REDIS, require
from test_redis import DELTA, START

from dtmcli import BarrierDatabaseError, DtmDuplicated, DtmFailure, DtmInvalidInput, local_gid
from dtmcli._barrier import redis as barrier_redis
from dtmcli.asyncio.barrier import BranchBarrier, query_prepared_redis
from dtmcli.barrier import BranchBarrier as SyncBarrier
from dtmcli.barrier import Decision


def with_clients(body: Callable[[Any, Any], Awaitable[None]]) -> None:
    """Run ``body(async_client, blocking_client)`` on a fresh event loop."""
    require("redis")
    import redis
    import redis.asyncio

    async def main() -> None:
        client = redis.asyncio.Redis(host=REDIS["host"], port=REDIS["port"])
        sync = redis.Redis(host=REDIS["host"], port=REDIS["port"])
        try:
            await body(client, sync)
        finally:
            await client.aclose()
            sync.close()

    asyncio.run(main())


async def adjust(client: Any, trans_type: str, gid: str, op: str, key: str, **kw: Any) -> Decision:
    return await BranchBarrier(trans_type, gid, "01", op).redis_check_adjust_amount(client, key, DELTA[op], **kw)


@pytest.mark.parametrize("trans_type,ops", [("saga", ("action", "compensate")), ("tcc", ("try", "cancel"))])
def test_every_order_with_duplicates(trans_type: str, ops: tuple[str, str]) -> None:
    async def body(client: Any, sync: Any) -> None:
        forward, compensation = ops
        for seq in itertools.product(ops, repeat=3):
            gid = local_gid()
            key = f"dtmcli-test-balance-{gid}"
            sync.set(key, START)
            applied = [op for op in seq if await adjust(client, trans_type, gid, op, key) is Decision.RUN]
            expected = [forward, compensation] if seq[0] == forward and compensation in seq else (
                [forward] if seq[0] == forward else [])
            assert applied == expected, seq
            assert int(sync.get(key)) == START + sum(DELTA[op] for op in expected), seq

    with_clients(body)


def test_keys_and_values_are_the_blocking_barriers() -> None:
    async def body(client: Any, sync: Any) -> None:
        gid = local_gid()
        key = f"dtmcli-test-balance-{gid}"
        sync.set(key, START)
        assert await adjust(client, "tcc", gid, "cancel", key, expire=120) is Decision.NULL_COMPENSATION
        assert sync.get(f"{gid}-01-cancel-01") == b"op"
        assert sync.get(f"{gid}-01-try-01") == b"rollback"
        assert 0 < sync.ttl(f"{gid}-01-try-01") <= 120
        # the blocking barrier sees the async barrier's markers, and the other way round
        assert SyncBarrier("tcc", gid, "01", "try").redis_check_adjust_amount(sync, key, -30) is Decision.DUPLICATE
        other = local_gid()
        assert SyncBarrier("saga", other, "01", "action").redis_check_adjust_amount(sync, key, 1) is Decision.RUN
        assert await adjust(client, "saga", other, "action", key) is Decision.DUPLICATE
        assert int(sync.get(key)) == START + 1

    with_clients(body)


def test_insufficient_balance_fails_without_a_marker() -> None:
    async def body(client: Any, sync: Any) -> None:
        gid = local_gid()
        key = f"dtmcli-test-balance-{gid}"
        sync.set(key, 10)
        with pytest.raises(DtmFailure):
            await adjust(client, "saga", gid, "action", key)
        assert int(sync.get(key)) == 10 and sync.exists(f"{gid}-01-action-01") == 0
        sync.set(key, "abc")
        with pytest.raises(BarrierDatabaseError, match="does not hold a 64-bit integer"):
            await adjust(client, "saga", gid, "action", key)
        assert sync.exists(f"{gid}-01-action-01") == 0
        with pytest.raises(DtmInvalidInput):
            await BranchBarrier("saga", gid, "01", "action").redis_check_adjust_amount(client, key, 2**63)

    with_clients(body)


def test_msg_duplicate_and_query_prepared() -> None:
    async def body(client: Any, sync: Any) -> None:
        gid = local_gid()
        key = f"dtmcli-test-balance-{gid}"
        sync.set(key, START)
        assert await BranchBarrier.for_msg(gid).redis_check_adjust_amount(client, key, 5) is Decision.RUN
        with pytest.raises(DtmDuplicated):
            await BranchBarrier.for_msg(gid).redis_check_adjust_amount(client, key, 5)
        await query_prepared_redis(gid, client)  # committed
        assert int(sync.get(key)) == START + 5

        late = local_gid()
        with pytest.raises(DtmFailure):
            await query_prepared_redis({"trans_type": "msg", "gid": late, "branch_id": "00", "op": "msg"}, client)
        assert sync.get(f"{late}-00-msg-01") == b"rollback"
        with pytest.raises(DtmDuplicated):
            await BranchBarrier.for_msg(late).redis_check_adjust_amount(client, key, 5)
        with pytest.raises(DtmFailure):
            await BranchBarrier.for_msg(late).redis_query_prepared(client)
        assert int(sync.get(key)) == START + 5

    with_clients(body)


def test_script_is_reloaded_after_flush() -> None:
    async def body(client: Any, sync: Any) -> None:
        for script in (barrier_redis.ADJUST_SCRIPT, barrier_redis.QUERY_PREPARED_SCRIPT):
            sync.script_flush()
            gid = local_gid()
            key = f"dtmcli-test-balance-{gid}"
            sync.set(key, START)
            if script is barrier_redis.ADJUST_SCRIPT:
                assert await adjust(client, "saga", gid, "action", key) is Decision.RUN
            else:
                with pytest.raises(DtmFailure):
                    await query_prepared_redis(gid, client)
            assert sync.script_exists(script.sha) == [True]

    with_clients(body)


def test_cluster_layout() -> None:
    async def body(client: Any, sync: Any) -> None:
        gid = local_gid()
        key = f"{{acct-{gid}}}:balance"
        sync.set(key, START)
        assert await adjust(client, "saga", gid, "compensate", key, layout="cluster") is Decision.NULL_COMPENSATION
        assert sync.get(f"{{acct-{gid}}}{len(gid)}:{gid}-2:01-6:action-2:01") == b"rollback"
        with pytest.raises(DtmFailure):
            await BranchBarrier.for_msg(gid).redis_query_prepared(client, layout="cluster", key=key)
        assert sync.get(f"{{acct-{gid}}}{len(gid)}:{gid}-2:00-3:msg-2:01") == b"rollback"
        with pytest.raises(DtmInvalidInput):
            await adjust(client, "saga", gid, "action", key, layout="sharded")

    with_clients(body)


def test_raced_deliveries_with_gather() -> None:
    """The same delivery many times at once runs once; raced action/compensate apply both or neither."""

    async def body(client: Any, sync: Any) -> None:
        import redis.asyncio

        clients = [redis.asyncio.Redis(host=REDIS["host"], port=REDIS["port"]) for _ in range(8)]
        try:
            for _round in range(5):
                gid = local_gid()
                key = f"dtmcli-test-balance-{gid}"
                sync.set(key, START)
                same = await asyncio.gather(*(adjust(c, "saga", gid, "action", key) for c in clients))
                assert same.count(Decision.RUN) == 1 and same.count(Decision.DUPLICATE) == 7

                gid = local_gid()
                sync.set(key, START)
                ops = ["action", "compensate"] * 4
                raced = await asyncio.gather(*(adjust(c, "saga", gid, op, key) for c, op in zip(clients, ops)))
                assert raced.count(Decision.RUN) in (0, 2)
                assert int(sync.get(key)) == START
        finally:
            for c in clients:
                await c.aclose()

    with_clients(body)


def test_blocking_and_async_clients_are_not_mixed_up() -> None:
    """Before: a blocking client ran the script on the event loop, then failed on awaiting its answer; an
    asyncio client given to the blocking barrier returned an unawaited coroutine as the answer."""

    async def body(client: Any, sync: Any) -> None:
        gid = local_gid()
        key = f"dtmcli-test-balance-{gid}"
        sync.set(key, START)
        with pytest.raises(DtmInvalidInput, match="blocking client"):
            await BranchBarrier("saga", gid, "01", "action").redis_check_adjust_amount(sync, key, 1)
        with pytest.raises(DtmInvalidInput, match="blocking client"):
            await query_prepared_redis(gid, sync)
        with pytest.raises(DtmInvalidInput, match="asyncio client"):
            SyncBarrier("saga", gid, "01", "action").redis_check_adjust_amount(client, key, 1)
        with pytest.raises(DtmInvalidInput, match="asyncio client"):
            barrier_redis.query_prepared(client, gid)
        assert int(sync.get(key)) == START and sync.exists(f"{gid}-01-action-01") == 0

    with_clients(body)
