"""Property-based model test of the barrier on real MariaDB, PostgreSQL and Redis (issue 10.10).

Hypothesis draws a legal delivery history for one branch -- saga (action/compensate), TCC (try,
then confirm or cancel, the cancel possibly overtaking the try) or msg (the local transaction
racing DTM's query_prepared) -- with duplicates, out-of-order deliveries, business functions that
fail (on Redis: a balance that cannot cover the amount, as if other transactions spent it), and
groups of deliveries sent at once from threads. It runs the history through the public
barrier API and compares each answer and the effects counted in a real table (or Redis counters)
with an abstract model of what must have run, written from the guarantees, not from the code:

* a forward op (action, try) runs once, and never after its compensation arrived;
* a compensation (compensate, cancel) runs once, and only if its forward op ran before it;
* confirm runs once;
* the msg local transaction runs once, and never after query_prepared found it missing; a repeat
  raises DtmDuplicated; query_prepared succeeds exactly when it ran before;
* a delivery whose business function fails leaves no trace: as if it never arrived; a repeated op
  or a null compensation has no business effect, so it cannot fail (it is decided first).

A group of concurrent deliveries may take effect in any order, so the run must match the model for
some serialization of each group. Examples are derandomized (reproducible);
``DTM_MODEL_EXAMPLES=500`` runs more of them.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pytest
from conftest import CONNECT, SERVICE, _prepare
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from services import REDIS, require

from dtmcli import BarrierConflict, DtmDuplicated, DtmFailure, local_gid
from dtmcli.barrier import BranchBarrier, Decision, query_prepared, query_prepared_redis

EFFECT_TABLE = "dtmcli_model_effect"
EXAMPLES = int(os.environ.get("DTM_MODEL_EXAMPLES", "60"))
MAX_GROUP = 3

FORWARD = {"saga": "action", "tcc": "try"}
COMPENSATION = {"saga": "compensate", "tcc": "cancel"}
BRANCH = {"saga": "01", "tcc": "01", "msg": "00"}
QUERY = "query_prepared"  # DTM's msg check, not a barrier op


class BusiFailed(Exception):
    """Raised by a business function drawn to fail."""


@dataclass(frozen=True)
class Delivery:
    op: str
    fail: bool = False  # the business function raises after writing its effect (Redis: the balance is short)


Step = tuple[Delivery, ...]  # one delivery, or several sent at once from threads


# -- the model ------------------------------------------------------------------------------------------------------

def model(trans_type: str, history: list[Delivery]) -> tuple[list[str], collections.Counter[str]]:
    """The answer of every delivery of a serial history, and how many times each op's effect ran."""
    seen: set[str] = set()  # ops answered without error at least once
    ran: collections.Counter[str] = collections.Counter()
    answers = []
    for d in history:
        if d.op == QUERY:
            answer = "ok" if ran["msg"] else "rolled_back"
            seen.add(QUERY)
        else:
            if trans_type == "msg":
                may_run, repeat = "msg" not in seen and QUERY not in seen, "duplicated"
            elif d.op == FORWARD.get(trans_type):
                may_run, repeat = d.op not in seen and COMPENSATION[trans_type] not in seen, "skip"
            elif d.op == COMPENSATION.get(trans_type):
                may_run, repeat = d.op not in seen and ran[FORWARD[trans_type]] > 0, "skip"
            else:  # confirm
                may_run, repeat = d.op not in seen, "skip"
            if may_run and d.fail:
                answer = "error"
            elif may_run:
                answer = "run"
                ran[d.op] += 1
            else:
                answer = repeat
            if answer != "error":
                seen.add(d.op)
        answers.append(answer)
    return answers, ran


def matches_model(trans_type: str, steps: list[list[tuple[Delivery, str]]], effects: dict[str, int]) -> bool:
    """Whether some serialization of each concurrent group gives these answers and effects."""
    want_answers = [sorted(a for _, a in step) for step in steps]
    for order in itertools.product(*(itertools.permutations(step) for step in steps)):
        history = [d for step in order for d, _ in step]
        answers, ran = model(trans_type, history)
        got, i = [], 0
        for step in order:
            got.append(sorted(answers[i : i + len(step)]))
            i += len(step)
        if got == want_answers and {op: ran[op] for op in effects} == effects:
            return True
    return False


# -- legal histories --------------------------------------------------------------------------------------------------

def _steps(ops: list[str], can_fail: bool) -> st.SearchStrategy[list[Step]]:
    delivery = st.builds(Delivery, st.sampled_from(ops), st.booleans() if can_fail else st.just(False))
    step = st.one_of(delivery.map(lambda d: (d,)), st.lists(delivery, min_size=2, max_size=MAX_GROUP).map(tuple))
    return st.lists(step, min_size=1, max_size=5)


@st.composite
def histories(draw: st.DrawFn, can_fail: bool) -> tuple[str, list[Step]]:
    trans_type = draw(st.sampled_from(["saga", "tcc", "msg"]))
    if trans_type == "saga":
        return trans_type, draw(_steps(["action", "compensate"], can_fail))
    if trans_type == "msg":
        return trans_type, draw(_steps(["msg", QUERY], can_fail))
    if draw(st.booleans()):  # the global transaction rolls back: cancel may overtake try
        return trans_type, draw(_steps(["try", "cancel"], can_fail))
    # it commits: DTM confirms only after a try answered success
    before = draw(_steps(["try"], can_fail)) if draw(st.booleans()) else []
    return trans_type, [*before, (Delivery("try"),), *draw(_steps(["try", "confirm"], can_fail))]


# -- the stores -----------------------------------------------------------------------------------------------------

class Store:
    """One backend: delivers one barrier call and reads the effects of a gid."""

    def deliver(self, slot: int, trans_type: str, gid: str, d: Delivery) -> str:
        raise NotImplementedError

    def effects(self, gid: str, ops: list[str]) -> dict[str, int]:
        raise NotImplementedError

    def prepare(self, gid: str, ops: list[str]) -> None:
        """Set up a fresh gid (Redis counters)."""


class SqlStore(Store):
    def __init__(self, driver: str) -> None:
        require(SERVICE[driver])
        _prepare(SERVICE[driver])
        self.conns = [CONNECT[driver]() for _ in range(MAX_GROUP + 1)]
        cur = self.conns[0].cursor()
        cur.execute(f"create table if not exists {EFFECT_TABLE} (gid varchar(128) not null, op varchar(45) not null)")
        cur.close()
        self.conns[0].commit()

    def deliver(self, slot: int, trans_type: str, gid: str, d: Delivery) -> str:
        conn = self.conns[slot]
        if d.op == QUERY:
            try:
                query_prepared(gid, conn)
                return "ok"
            except DtmFailure:
                return "rolled_back"

        def busi(tx: Any) -> str:
            cur = tx.cursor()
            cur.execute(f"insert into {EFFECT_TABLE} (gid, op) values (%s, %s)", (gid, d.op))
            cur.close()
            if d.fail:
                raise BusiFailed(d.op)
            return "ran"

        try:
            result = BranchBarrier(trans_type, gid, BRANCH[trans_type], d.op).call(conn, busi)
        except DtmDuplicated:
            return "duplicated"
        except BusiFailed:
            return "error"
        return "run" if result == "ran" else "skip"

    def effects(self, gid: str, ops: list[str]) -> dict[str, int]:
        conn = self.conns[-1]
        cur = conn.cursor()
        cur.execute(f"select op, count(*) from {EFFECT_TABLE} where gid = %s group by op", (gid,))
        counts = {str(op): int(n) for op, n in cur.fetchall()}
        cur.close()
        conn.rollback()
        return {op: counts.get(op, 0) for op in ops}

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


class RedisStore(Store):
    """Each op adds 1 to its own counter; all counters of a gid share one hash tag (for the cluster layout).

    A failing delivery subtracts more than the counter holds: the barrier answers FAILURE if it applies it.
    """

    SHORT = -(10**9)

    def __init__(self) -> None:
        require("redis")
        import redis

        self.clients = [redis.Redis(host=REDIS["host"], port=REDIS["port"]) for _ in range(MAX_GROUP + 1)]
        self.layout = "go"

    @staticmethod
    def key(gid: str, op: str) -> str:
        return f"{{dtmcli-model-{gid}}}:{op}"

    def prepare(self, gid: str, ops: list[str]) -> None:
        for op in ops:
            self.clients[0].set(self.key(gid, op), 0, ex=600)

    def deliver(self, slot: int, trans_type: str, gid: str, d: Delivery) -> str:
        client = self.clients[slot]
        if d.op == QUERY:
            try:
                query_prepared_redis(gid, client, layout=self.layout, key=self.key(gid, "msg"))
                return "ok"
            except DtmFailure:
                return "rolled_back"
        bb = BranchBarrier(trans_type, gid, BRANCH[trans_type], d.op)
        amount = self.SHORT if d.fail else 1
        try:
            decision = bb.redis_check_adjust_amount(client, self.key(gid, d.op), amount, layout=self.layout)
        except DtmDuplicated:
            return "duplicated"
        except DtmFailure:
            return "error"
        return "run" if decision is Decision.RUN else "skip"

    def effects(self, gid: str, ops: list[str]) -> dict[str, int]:
        return {op: int(self.clients[-1].get(self.key(gid, op)) or 0) for op in ops}

    def close(self) -> None:
        for client in self.clients:
            client.close()


def deliver_group(store: Store, trans_type: str, gid: str, step: Step) -> list[Optional[str]]:
    """Deliver a step's deliveries at once from threads; ``None`` for one refused as a conflict (425)."""
    answers: list[Optional[str]] = [None] * len(step)
    errors: list[BaseException] = []
    start = threading.Barrier(len(step))

    def worker(i: int, d: Delivery) -> None:
        try:
            start.wait()
            answers[i] = store.deliver(i, trans_type, gid, d)
        except BarrierConflict:
            pass  # DTM delivers it again later
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, d)) for i, d in enumerate(step)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return answers


def run_history(store: Store, trans_type: str, steps: list[Step]) -> tuple[list[list[tuple[Delivery, str]]], str]:
    """Deliver every step on a fresh gid; a delivery refused as a conflict is delivered again after its group."""
    gid = local_gid()
    store.prepare(gid, [*{d.op for step in steps for d in step if d.op != QUERY}])
    done: list[list[tuple[Delivery, str]]] = []
    for step in steps:
        answers = deliver_group(store, trans_type, gid, step)
        done.append([(d, a) for d, a in zip(step, answers) if a is not None])
        done.extend([(d, store.deliver(0, trans_type, gid, d))] for d, a in zip(step, answers) if a is None)
    return [s for s in done if s], gid


# -- the tests ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stores() -> Iterator[dict[str, Store]]:
    opened: dict[str, Store] = {}
    yield opened
    for store in opened.values():
        store.close()


def _store(stores: dict[str, Store], name: str, make: Callable[[], Store]) -> Store:
    if name not in stores:
        stores[name] = make()
    return stores[name]


def check(store: Store, trans_type: str, steps: list[Step]) -> None:
    done, gid = run_history(store, trans_type, steps)
    ops = sorted({d.op for step in steps for d in step if d.op != QUERY})
    effects = store.effects(gid, ops)
    assert matches_model(trans_type, done, effects), (
        f"{trans_type} gid={gid}: answers {[[(d.op, d.fail, a) for d, a in s] for s in done]}, effects {effects}; "
        f"model for the serial order: {model(trans_type, [d for s in done for d, _ in s])}"
    )


_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("driver", ["pymysql", "psycopg2", "psycopg"])
@_SETTINGS
@given(history=histories(can_fail=True))
def test_sql_barrier_matches_the_model(stores: dict[str, Store], driver: str, history: tuple[str, list[Step]]) -> None:
    check(_store(stores, driver, lambda: SqlStore(driver)), *history)


@_SETTINGS
@given(history=histories(can_fail=True), layout=st.sampled_from(["go", "cluster"]))
def test_redis_barrier_matches_the_model(
    stores: dict[str, Store], history: tuple[str, list[Step]], layout: str
) -> None:
    store = _store(stores, "redis", RedisStore)
    assert isinstance(store, RedisStore)
    store.layout = layout
    check(store, *history)


def test_the_model_itself() -> None:
    """Spot checks of the model against the protocol's examples (protocol.md §7)."""
    a, c = Delivery("action"), Delivery("compensate")
    assert model("saga", [c, a, c]) == (["skip", "skip", "skip"], collections.Counter())  # null comp. + suspension
    assert model("saga", [a, a, c, c])[0] == ["run", "skip", "run", "skip"]
    assert model("saga", [Delivery("action", fail=True), c, a])[0] == ["error", "skip", "skip"]
    assert model("tcc", [Delivery("try"), Delivery("confirm"), Delivery("confirm")])[0] == ["run", "run", "skip"]
    m, q = Delivery("msg"), Delivery(QUERY)
    assert model("msg", [q, m, q])[0] == ["rolled_back", "duplicated", "rolled_back"]
    assert model("msg", [m, m, q])[0] == ["run", "duplicated", "ok"]
    done = [[(a, "run"), (c, "run")]]  # a concurrent pair may serialize as action, compensate
    assert matches_model("saga", done, {"action": 1, "compensate": 1})
    assert not matches_model("saga", [[(c, "run")]], {"compensate": 1})
