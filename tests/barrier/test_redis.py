"""Redis barrier on a real Redis server: every order with duplicates, races, NOSCRIPT, layouts, failed calls."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Iterator, Optional

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from services import in_ci

from dtmcli import BarrierDatabaseError, DtmDuplicated, DtmFailure, DtmInvalidInput, local_gid
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


def test_insufficient_balance_fails_without_a_marker(redis_client: Any) -> None:
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
    assert redis_client.get(f"{{{tag}}}{len(gid)}:{gid}-2:01-6:action-2:01") == b"rollback"
    assert barrier_redis.hash_tag(key) == tag
    assert barrier_redis.hash_tag("plain") == "plain"
    assert barrier_redis.hash_tag("a{}b{c}") == "a{}b{c}"
    assert barrier_redis.slot_tag("a{}b{c}") != "a{}b{c}"  # it contains '}': "{a{}b{c}}..." hashes "a{"
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


# -- a failed call writes nothing, so DTM's redelivery applies the effect once (issue 10.7) ----------------------

INT64_MAX = 2**63 - 1


def _marker_keys(client: Any, gid: str, key: str) -> set[bytes]:
    """Every key holding ``gid`` except the business key: the barrier markers of that transaction."""
    return {k for k in client.scan_iter(match=f"*{gid}*", count=1000) if k != key.encode()}


def _fresh(client: Any, value: Any, *, hash_value: bool = False) -> tuple[str, str]:
    gid = local_gid()
    key = f"dtmcli-test-balance-{gid}"
    if hash_value:
        client.hset(key, "balance", value)
    else:
        client.set(key, value)
    return gid, key


@pytest.mark.parametrize(
    "stored",
    ["1.5", "abc", "", " 1", "1 ", "+1", "01", "-0", "1e3", "0x10", str(2**63), str(-(2**63) - 1), "9" * 25],
)
def test_non_integer_balance_is_refused_before_any_write(redis_client: Any, stored: str) -> None:
    for op, applied_before in (("action", []), ("compensate", ["action"])):
        gid, key = _fresh(redis_client, START)
        for before in applied_before:
            assert adjust(redis_client, "saga", gid, before, key) is Decision.RUN
        markers = _marker_keys(redis_client, gid, key)
        redis_client.set(key, stored)
        with pytest.raises(BarrierDatabaseError, match="does not hold a 64-bit integer"):
            adjust(redis_client, "saga", gid, op, key)
        assert redis_client.get(key) == stored.encode()
        assert _marker_keys(redis_client, gid, key) == markers
        redis_client.set(key, START)  # the operator fixes the value; DTM redelivers
        assert adjust(redis_client, "saga", gid, op, key) is Decision.RUN
        assert adjust(redis_client, "saga", gid, op, key) is Decision.DUPLICATE
        assert int(redis_client.get(key)) == START + DELTA[op]
        redis_client.delete(key)
    # a null compensation adds nothing: it never reads the balance
    gid, key = _fresh(redis_client, stored)
    assert adjust(redis_client, "saga", gid, "compensate", key) is Decision.NULL_COMPENSATION
    assert adjust(redis_client, "saga", gid, "action", key) is Decision.DUPLICATE
    assert redis_client.get(key) == stored.encode()
    redis_client.delete(key)


def test_wrong_type_balance_is_refused_before_any_write(redis_client: Any) -> None:
    gid, key = _fresh(redis_client, START, hash_value=True)
    with pytest.raises(BarrierDatabaseError, match="does not hold a 64-bit integer"):
        adjust(redis_client, "saga", gid, "action", key)
    assert _marker_keys(redis_client, gid, key) == set()
    redis_client.delete(key)
    redis_client.set(key, START)
    assert adjust(redis_client, "saga", gid, "action", key) is Decision.RUN
    assert int(redis_client.get(key)) == START - 30
    redis_client.delete(key)


def test_overflow_is_refused_before_any_write(redis_client: Any) -> None:
    def call(gid: str, op: str, key: str, amount: int) -> Decision:
        return BranchBarrier("saga", gid, "01", op).redis_check_adjust_amount(redis_client, key, amount)

    gid, key = _fresh(redis_client, INT64_MAX - 29)
    with pytest.raises(BarrierDatabaseError, match="64-bit integer range"):
        call(gid, "action", key, 30)
    assert int(redis_client.get(key)) == INT64_MAX - 29
    assert _marker_keys(redis_client, gid, key) == set()
    redis_client.set(key, START)  # fixed; DTM redelivers
    assert [call(gid, "action", key, 30) for _ in range(2)] == [Decision.RUN, Decision.DUPLICATE]
    assert int(redis_client.get(key)) == START + 30

    # a null compensation adds nothing, so it cannot overflow
    redis_client.set(key, INT64_MAX - 29)
    assert call(local_gid(), "compensate", key, 30) is Decision.NULL_COMPENSATION
    # the overflowing compensation of an applied action leaves the markers as they were
    gid = local_gid()
    assert call(gid, "action", key, 0) is Decision.RUN
    with pytest.raises(BarrierDatabaseError, match="64-bit integer range"):
        call(gid, "compensate", key, 30)
    assert int(redis_client.get(key)) == INT64_MAX - 29
    assert _marker_keys(redis_client, gid, key) == {f"{gid}-01-action-01".encode()}
    redis_client.set(key, START)
    assert [call(gid, "compensate", key, 30) for _ in range(2)] == [Decision.RUN, Decision.DUPLICATE]
    assert int(redis_client.get(key)) == START + 30
    redis_client.delete(key)


@pytest.mark.parametrize("amount", [2**63, -(2**63) - 1, 10**30, True, 1.0, "5", None])
def test_amount_outside_int64_is_refused_before_anything_is_sent(redis_client: Any, amount: Any) -> None:
    gid, key = _fresh(redis_client, START)
    with pytest.raises(DtmInvalidInput, match="amount"):
        BranchBarrier("saga", gid, "01", "action").redis_check_adjust_amount(redis_client, key, amount)
    assert _marker_keys(redis_client, gid, key) == set()
    assert BranchBarrier("saga", gid, "01", "action").redis_check_adjust_amount(redis_client, key, -5) is Decision.RUN
    assert int(redis_client.get(key)) == START - 5
    redis_client.delete(key)


def test_business_key_cannot_be_a_marker_key(redis_client: Any) -> None:
    gid, _ = _fresh(redis_client, START)
    marker = f"{gid}-01-action-01"
    redis_client.set(marker, START)
    with pytest.raises(DtmInvalidInput, match="marker key"):
        adjust(redis_client, "saga", gid, "action", marker)
    assert int(redis_client.get(marker)) == START
    redis_client.delete(marker)


@pytest.mark.parametrize(
    "amount,expire,same_key",
    [("1.5", "60", False), ("9223372036854775808", "60", False), ("-0", "60", False),
     ("5", "0", False), ("5", "-1", False), ("5", "99999999999999999999", False), ("5", "1.5", False),
     ("5", "60", True)],
)
def test_script_refuses_bad_arguments_without_writing(
    redis_client: Any, amount: str, expire: str, same_key: bool
) -> None:
    """The script's own guards, for callers that bypass the Python checks (another client, a bug)."""
    gid, key = _fresh(redis_client, START)
    marker = key if same_key else f"{gid}-01-action-01"
    script = barrier_redis.ADJUST_SCRIPT
    script.text  # noqa: B018 - load the text before calling by SHA
    redis_client.script_load(script.text)
    answer = redis_client.evalsha(script.sha, 3, key, marker, f"{gid}-01--01", amount, "", expire)
    assert answer == b"BAD_ARGUMENT"
    assert int(redis_client.get(key)) == START
    assert _marker_keys(redis_client, gid, key) == set()
    redis_client.delete(key)


def _canonical_int64(text: str) -> Optional[int]:
    """The value Redis's INCRBY accepts in ``text`` (string2ll: canonical decimal within int64), else None."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if str(value) == text and -(2**63) <= value <= INT64_MAX else None


_EDGES = [0, 1, -1, 30, -30, 999_999_999, 1_000_000_000, -1_000_000_000, 2**53, 2**53 + 1, 2**62 + 1,
          -(2**62) - 2, INT64_MAX, INT64_MAX - 1, INT64_MAX - 807, 9223372036854775000, -(2**63), -(2**63) + 1]
_INT64 = st.one_of(st.sampled_from(_EDGES), st.integers(-(2**63), INT64_MAX),
                   st.sampled_from(_EDGES).flatmap(lambda e: st.integers(-2000, 2000).map(lambda d: e + d)))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(balance=st.one_of(_INT64.map(str), st.text("0123456789-+. e", max_size=21)), amount=_INT64)
@example(balance="9223372036854775000", amount=807)  # exactly INT64_MAX: doubles would round it to 2**63
@example(balance=str(2**62 + 1), amount=-(2**62) - 2)  # exactly -1: doubles would round it to 0
def test_adjust_matches_exact_int64_arithmetic(redis_client: Any, balance: str, amount: int) -> None:
    """Whatever the stored text and the amount, the script decides as exact integer arithmetic does."""
    gid, key = _fresh(redis_client, balance)
    bb = BranchBarrier("saga", gid, "01", "action")
    stored = _canonical_int64(balance)
    try:
        if not -(2**63) <= amount <= INT64_MAX:
            with pytest.raises(DtmInvalidInput):
                bb.redis_check_adjust_amount(redis_client, key, amount)
        elif stored is None:
            with pytest.raises(BarrierDatabaseError, match="does not hold"):
                bb.redis_check_adjust_amount(redis_client, key, amount)
        elif stored + amount < 0:
            with pytest.raises(DtmFailure):
                bb.redis_check_adjust_amount(redis_client, key, amount)
        elif stored + amount > INT64_MAX:
            with pytest.raises(BarrierDatabaseError, match="64-bit integer range"):
                bb.redis_check_adjust_amount(redis_client, key, amount)
        else:
            assert bb.redis_check_adjust_amount(redis_client, key, amount) is Decision.RUN
            assert int(redis_client.get(key)) == stored + amount
            assert _marker_keys(redis_client, gid, key) == {f"{gid}-01-action-01".encode()}
            return
        assert redis_client.get(key) == balance.encode()
        assert _marker_keys(redis_client, gid, key) == set()
    finally:
        redis_client.delete(key)


# -- cluster layout: every key of a script in the business key's slot ---------------------------------------------

def _reference_slot(key: str) -> int:
    """Redis Cluster's key slot, written from the cluster specification independently of the SDK's code."""
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end != -1 and end != start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        for bit in range(7, -1, -1):
            top = (crc >> 15) ^ ((byte >> bit) & 1)
            crc = ((crc << 1) & 0xFFFF) ^ (0x1021 if top else 0)
    return crc % 16384


def _brace_keys(gid: str) -> list[str]:
    """Business keys of every brace shape: a tag, an empty tag, an unclosed or stray brace, two tags."""
    return [f"a{{b}}c{gid}", f"{{}}x{gid}", f"x{gid}{{", f"{{a{gid}}}{{b}}", f"x{gid}}}", f"a{{}}b{{c}}{gid}",
            f"}}{{{gid}", f"{{{gid}}}", f"plain-{gid}", f"é{{ü{gid}}}", f"{{}}{gid}}}"]


def test_reference_slot_function() -> None:
    assert _reference_slot("123456789") == 0x31C3 % 16384  # the CRC-16/XMODEM check value
    assert (_reference_slot("foo"), _reference_slot("bar"), _reference_slot("hello")) == (12182, 5061, 866)
    assert _reference_slot("{user1000}.following") == _reference_slot("{user1000}.followers")
    assert _reference_slot("foo{}{bar}") == 8363 != _reference_slot("bar")  # an empty first tag: the whole key
    assert _reference_slot("foo{{bar}}zap") == _reference_slot("{bar")
    assert _reference_slot("foo{bar}{zap}") == _reference_slot("bar")


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.text(alphabet=st.sampled_from("{}ab\u00e9x"), min_size=1, max_size=12))
@example("a{b}c")
@example("{}x")
@example("x{")
@example("{a}{b}")
@example("x}")
def test_slot_tag_is_in_the_keys_slot(key: str) -> None:
    assert barrier_redis.key_slot(key) == _reference_slot(key)
    tag = barrier_redis.slot_tag(key)
    assert "}" not in tag and tag
    marker = barrier_redis.barrier_key("gid{}x", "01", "action", "01", layout="cluster", tag=tag)
    assert _reference_slot(marker) == _reference_slot(key)


def test_slot_tag_is_pinned() -> None:
    """Markers already written must be found after an upgrade: the cluster layout must not change."""
    assert barrier_redis.slot_tag("a{b}c") == "b"
    assert barrier_redis.slot_tag("x{") == "x{"
    assert barrier_redis.slot_tag("{}x") == "11001100111010"
    assert barrier_redis.slot_tag("x}") == "01010010010101"
    tags = {barrier_redis._binary_tag(slot) for slot in range(16384)}
    assert len(tags) == 16384 and all(_reference_slot("{" + t + "}") == barrier_redis.key_slot(t) for t in tags)


def test_cluster_layout_keys_share_the_business_key_slot(redis_client: Any) -> None:
    """The keys the script really wrote (found with SCAN) all hash to the business key's slot."""
    for run_op, ops, expected_markers in (("null compensation", ("compensate", "action"), 2),
                                         ("applied", ("action", "compensate"), 2)):
        gid = local_gid()
        for index, key in enumerate(_brace_keys(gid)):
            redis_client.set(key, START)
            sub = f"{gid}n{index}"
            for op in ops:
                BranchBarrier("saga", sub, "01", op).redis_check_adjust_amount(
                    redis_client, key, DELTA[op], layout="cluster")
            markers = _marker_keys(redis_client, sub, key)
            assert len(markers) == expected_markers, (run_op, key, markers)
            slots = {_reference_slot(m.decode()) for m in markers}
            assert slots == {_reference_slot(key)}, (run_op, key, markers)
            redis_client.delete(key, *markers)
    gid = local_gid()
    key = f"{{}}x{gid}"
    with pytest.raises(DtmFailure):
        query_prepared_redis(gid, redis_client, layout="cluster", key=key)
    marker = barrier_redis.barrier_key(gid, "00", "msg", "01", layout="cluster", tag=barrier_redis.slot_tag(key))
    assert redis_client.get(marker) == b"rollback" and _reference_slot(marker) == _reference_slot(key)
    redis_client.delete(marker)


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[Any]:
    """A throwaway Redis Cluster node (one node owning every slot) on a unix socket, started for these tests."""
    import redis

    server = shutil.which("redis-server")
    if server is None:
        if in_ci():
            pytest.fail("redis-server is needed for the Redis Cluster tests (CI=true)")
        pytest.skip("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="dtmcli-cluster-") as workdir:
        sock = os.path.join(workdir, "redis.sock")
        proc = subprocess.Popen(
            [server, "--port", "0", "--unixsocket", sock, "--cluster-enabled", "yes", "--cluster-config-file",
             os.path.join(workdir, "nodes.conf"), "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(unix_socket_path=sock)
            deadline = time.monotonic() + 15
            while True:
                try:
                    client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                assert time.monotonic() < deadline, "the cluster node did not come up"
                time.sleep(0.05)
            yield client
            client.close()
        finally:
            proc.terminate()
            proc.wait(10)


def test_cluster_layout_on_a_real_cluster_node(cluster_node: Any) -> None:
    """A cluster node refuses a script whose keys span slots (CROSSSLOT); the cluster layout never does."""
    gid = local_gid()
    for index, key in enumerate(_brace_keys(gid)):
        assert cluster_node.execute_command("CLUSTER", "KEYSLOT", key) == barrier_redis.key_slot(key)
        cluster_node.set(key, START)
        sub = f"{gid}n{index}"
        for op in ("compensate", "action", "action"):
            BranchBarrier("saga", sub, "02", op).redis_check_adjust_amount(
                cluster_node, key, DELTA[op], layout="cluster")
        for op, expected in (("action", Decision.RUN), ("action", Decision.DUPLICATE), ("compensate", Decision.RUN)):
            assert BranchBarrier("saga", sub, "01", op).redis_check_adjust_amount(
                cluster_node, key, DELTA[op], layout="cluster") is expected
        assert int(cluster_node.get(key)) == START
        with pytest.raises(DtmFailure):
            query_prepared_redis(sub, cluster_node, layout="cluster", key=key)
    with pytest.raises(BarrierDatabaseError, match="CrossSlot"):
        adjust(cluster_node, "saga", gid, "action", f"{{}}x{gid}")  # the Go layout ignores slots


# -- the markers decide before the balance: only the call that applies the amount can fail on it ----------------

def _spend(client: Any, key: str, state: str) -> None:
    """Change the balance behind the barrier's back: other transactions spent it, or it is gone or broken."""
    if state == "spent":
        client.set(key, 10)
    elif state == "missing":
        client.delete(key)
    elif state == "not an integer":
        client.set(key, "1.5")
    else:
        client.set(key, INT64_MAX)  # full: adding more overflows


BALANCE_STATES = ["spent", "missing", "not an integer", "full"]


@pytest.mark.parametrize("state", BALANCE_STATES)
@pytest.mark.parametrize("trans_type,op", [("saga", "action"), ("saga", "compensate"), ("tcc", "try"),
                                           ("tcc", "confirm"), ("tcc", "cancel")])
def test_redelivered_applied_op_is_a_duplicate_whatever_the_balance(
    redis_client: Any, trans_type: str, op: str, state: str
) -> None:
    """An applied op delivered again after the balance changed answers DUPLICATE, not FAILURE (DTM would
    compensate a branch whose effect is applied) nor a 500."""
    gid, key = _fresh(redis_client, START)
    forward = {"compensate": "action", "cancel": "try"}.get(op)
    if forward:
        assert adjust(redis_client, trans_type, gid, forward, key) is Decision.RUN
    amount = -30 if state == "spent" else 30

    def deliver() -> Decision:
        return BranchBarrier(trans_type, gid, "01", op).redis_check_adjust_amount(redis_client, key, amount)

    assert deliver() is Decision.RUN
    markers = _marker_keys(redis_client, gid, key)
    _spend(redis_client, key, state)
    before = redis_client.get(key)
    assert deliver() is Decision.DUPLICATE
    assert redis_client.get(key) == before
    assert _marker_keys(redis_client, gid, key) == markers
    redis_client.delete(key)


@pytest.mark.parametrize("state", BALANCE_STATES)
@pytest.mark.parametrize("layout", ["go", "cluster"])
def test_debiting_null_compensation_keeps_anti_suspension(redis_client: Any, state: str, layout: str) -> None:
    """A compensation arriving before its op is a null compensation whatever the balance: it writes its markers,
    so the suspended op arriving later is a duplicate and never runs."""
    gid = local_gid()
    key = f"{{acct-{gid}}}:balance"
    redis_client.set(key, START)
    _spend(redis_client, key, state)
    before = redis_client.get(key)
    amount = -30 if state == "spent" else 30  # the compensation of a credit debits
    for trans_type, compensation, forward in (("saga", "compensate", "action"), ("tcc", "cancel", "try")):
        comp = BranchBarrier(trans_type, gid, "01", compensation)
        assert comp.redis_check_adjust_amount(redis_client, key, amount, layout=layout) is Decision.NULL_COMPENSATION
        late = BranchBarrier(trans_type, gid, "01", forward)
        assert late.redis_check_adjust_amount(redis_client, key, 1, layout=layout) is Decision.DUPLICATE
        again = BranchBarrier(trans_type, gid, "01", compensation)
        assert again.redis_check_adjust_amount(redis_client, key, amount, layout=layout) is Decision.DUPLICATE
    assert redis_client.get(key) == before
    assert len(_marker_keys(redis_client, gid, key)) == 4
    redis_client.delete(key, *_marker_keys(redis_client, gid, key))


def test_msg_repeat_is_duplicated_whatever_the_balance(redis_client: Any) -> None:
    """A repeated msg local step raises DtmDuplicated (done or rolled back), never DtmFailure."""
    gid, key = _fresh(redis_client, START)
    assert BranchBarrier.for_msg(gid).redis_check_adjust_amount(redis_client, key, -30) is Decision.RUN
    redis_client.set(key, 10)
    with pytest.raises(DtmDuplicated):
        BranchBarrier.for_msg(gid).redis_check_adjust_amount(redis_client, key, -30)
    late = local_gid()
    with pytest.raises(DtmFailure):
        query_prepared_redis(late, redis_client)  # rolled back before the local step ran
    with pytest.raises(DtmDuplicated):
        BranchBarrier.for_msg(late).redis_check_adjust_amount(redis_client, key, -30)
    assert int(redis_client.get(key)) == 10
    redis_client.delete(key, f"{late}-00-msg-01")


# -- marker keys: unambiguous in the cluster layout, the Go client's (ambiguous) keys in the go layout ------------

def test_cluster_layout_keeps_transactions_with_dashes_apart(redis_client: Any) -> None:
    """msg ``order-X`` branch ``01-01`` and saga ``order-X-01`` branch ``01`` are different transactions."""
    base = f"order-{local_gid()}"
    k1, k2 = f"{{acct-{base}}}:a", f"{{acct-{base}}}:b"
    redis_client.set(k1, 0)
    redis_client.set(k2, 0)
    first = BranchBarrier("msg", base, "01-01", "action")
    second = BranchBarrier("saga", f"{base}-01", "01", "action")
    assert first.redis_check_adjust_amount(redis_client, k1, 10, layout="cluster") is Decision.RUN
    assert second.redis_check_adjust_amount(redis_client, k2, 10, layout="cluster") is Decision.RUN
    assert (int(redis_client.get(k1)), int(redis_client.get(k2))) == (10, 10)
    # the go layout is byte-compatible with the Go client, whose keys for these two coincide (documented hazard)
    assert barrier_redis.barrier_key(base, "01-01", "action", "01") == f"{base}-01-01-action-01"
    assert barrier_redis.barrier_key(f"{base}-01", "01", "action", "01") == f"{base}-01-01-action-01"
    redis_client.delete(k1, k2, *_marker_keys(redis_client, base, k1))


_FIELD = st.text(alphabet=st.sampled_from("-:{}0123456789a\u00e9"), min_size=1, max_size=8)


def _parse_cluster_key(key: str) -> tuple[str, tuple[str, ...]]:
    """Split a cluster-layout marker key back into its hash tag and its four fields."""
    assert key.startswith("{")
    end = key.index("}")
    tag, rest, fields = key[1:end], key[end + 1 :], []
    for index in range(4):
        size, _, rest = rest.partition(":")
        assert size == str(int(size))
        fields.append(rest[: int(size)])
        rest = rest[int(size) :]
        if index < 3:
            assert rest.startswith("-")
            rest = rest[1:]
    assert rest == ""
    return tag, tuple(fields)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tag=st.text(alphabet=st.sampled_from("{ab-:"), min_size=1, max_size=5),
       fields=st.tuples(_FIELD, _FIELD, _FIELD, _FIELD))
def test_cluster_key_decodes_to_its_fields(tag: str, fields: tuple[str, str, str, str]) -> None:
    """A cluster key determines its tag and fields, so different barriers never share a marker."""
    key = barrier_redis.barrier_key(*fields, layout="cluster", tag=tag)
    assert _parse_cluster_key(key) == (tag, fields)
    assert barrier_redis.key_slot(key) == barrier_redis.key_slot("{" + tag + "}")
