"""Barrier overhead per backend: the same business write, bare vs inside the barrier.

MariaDB and PostgreSQL: one UPDATE in its own transaction, bare, vs ``BranchBarrier.call`` (op=action:
one barrier INSERT, the UPDATE, one commit). ``--ops compensate`` also measures a saga branch and its
compensation (action, then compensate of the same gid: two transactions each way; the compensation
inserts two barrier rows, in one statement where the database allows it).
Redis: one INCRBY, bare, vs the barrier's Lua script by SHA (one round trip). Each thread has its
own connection and its own row/key, so the figures show the barrier's cost, not lock contention.
Every barrier call uses a fresh gid, so each one takes the real insert path.

The variants of a cell run in interleaved slices (``--slice`` seconds each, the order rotating every
round) for ``--seconds`` per variant in all: on a shared machine the load then changes under all of
them alike. Each ratio is the median over the rounds of that round's ratio; the ops/s shown are the
medians of the slices.

Usage: python bench/barrier_overhead.py [--seconds 4] [--slice 0.25] [--backends mysql,postgres,redis]
       [--threads 1,8] [--ops action,compensate]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from typing import Any, Callable

from dtmcli.barrier import BranchBarrier, create_schema

MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "", "database": "test"}
PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"
_seq = itertools.count()

Op = Callable[[Any, int], None]
BarrierClass = Callable[[str, str, str, str], Any]


def fresh_gid() -> str:
    return f"bench{next(_seq)}-{threading.get_ident() % 100000}-{time.time_ns() % 10**9}"


def sql_ops(placeholder: str, barrier: BarrierClass = BranchBarrier) -> dict[str, Op]:
    """bare (the UPDATE and its commit), extra (plus one INSERT into a uniquely keyed table), barrier (op=action)."""
    update = f"UPDATE bench_account SET balance = balance + 1 WHERE id = {placeholder}"
    insert = f"INSERT INTO bench_log (k) VALUES ({placeholder})"

    def bare(conn: Any, row: int) -> None:
        with conn.cursor() as cur:
            cur.execute(update, (row,))
        conn.commit()

    def busi_of(row: int) -> Callable[[Any], None]:
        def busi(c: Any) -> None:
            with c.cursor() as cur:
                cur.execute(update, (row,))

        return busi

    def with_barrier(conn: Any, row: int) -> None:
        barrier("saga", fresh_gid(), "01", "action").call(conn, busi_of(row))

    def bare_plus_insert(conn: Any, row: int) -> None:
        with conn.cursor() as cur:
            cur.execute(insert, (f"k{next(_seq)}-{threading.get_ident()}-{time.time_ns()}",))
            cur.execute(update, (row,))
        conn.commit()

    def action_and_compensate(conn: Any, row: int) -> None:
        gid = fresh_gid()
        barrier("saga", gid, "01", "action").call(conn, busi_of(row))
        barrier("saga", gid, "01", "compensate").call(conn, busi_of(row))

    def twice(op: Op) -> Op:
        def run(conn: Any, row: int) -> None:
            op(conn, row)
            op(conn, row)

        return run

    return {"bare": bare, "extra": bare_plus_insert, "barrier": with_barrier,
            "bare/compensate": twice(bare), "extra/compensate": twice(bare_plus_insert),
            "barrier/compensate": action_and_compensate}


def redis_ops(barrier: BarrierClass = BranchBarrier) -> dict[str, Op]:
    def bare(client: Any, row: int) -> None:
        client.incrby(f"bench:acct:{row}", 1)

    def bare_plus_trip(client: Any, row: int) -> None:
        client.incrby(f"bench:acct:{row}", 1)
        client.exists(f"bench:other:{row}")

    def with_barrier(client: Any, row: int) -> None:
        barrier("saga", fresh_gid(), "01", "action").redis_check_adjust_amount(client, f"bench:acct:{row}", 1, 60)

    return {"bare": bare, "extra": bare_plus_trip, "barrier": with_barrier}


def setup_sql(connect: Callable[[], Any], rows: int) -> None:
    conn = connect()
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS bench_account")
        cur.execute("DROP TABLE IF EXISTS bench_log")
        cur.execute("CREATE TABLE bench_log (k VARCHAR(128) PRIMARY KEY)")
        cur.execute("CREATE TABLE bench_account (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
        for i in range(rows):
            cur.execute("INSERT INTO bench_account VALUES (%s, 0)" % int(i))  # noqa: UP031 - literal ints only
    conn.commit()
    create_schema(conn)
    conn.close()


def _slice(threads: int, seconds: float, conns: list[Any], op: Op) -> float:
    """Ops/s of ``op`` run by ``threads`` workers for ``seconds``, each on its own connection and row."""
    counts = [0] * threads
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            op(conns[i], i)
            counts[i] += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def measure(threads: int, seconds: float, slice_s: float, connect: Callable[[], Any],
            ops: dict[str, Op]) -> dict[str, list[float]]:
    """Per op, its ops/s in each round; the ops run in interleaved slices, the order rotating every round."""
    conns = [connect() for _ in range(threads)]
    names = list(ops)
    for name in names:  # warm-up: connections, prepared statements, the barrier's table check
        for i in range(threads):
            ops[name](conns[i], i)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(1, round(seconds / slice_s))):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(_slice(threads, slice_s, conns, ops[name]))
    for c in conns:
        c.close()
    return rates


def cost(rates: dict[str, list[float]], name: str, base: str = "bare") -> float:
    """Median over the rounds of rate(base) / rate(name): how many times the cost of ``base`` ``name`` is."""
    return statistics.median(b / w for b, w in zip(rates[base], rates[name]))


def connectors() -> dict[str, tuple[Callable[[], Any], Callable[[int], Any]]]:
    import psycopg2
    import pymysql
    import redis

    def my() -> Any:
        return pymysql.connect(**MYSQL)

    def pg() -> Any:
        return psycopg2.connect(PG)

    def rd() -> Any:
        return redis.Redis(host="127.0.0.1", port=6379)

    return {
        "mysql": (my, lambda n: setup_sql(my, n)),
        "postgres": (pg, lambda n: setup_sql(pg, n)),
        "redis": (rd, lambda n: [rd().set(f"bench:acct:{i}", 10**9) for i in range(n)]),
    }


def ops_for(backend: str, op: str, barrier: BarrierClass = BranchBarrier) -> dict[str, Op]:
    """The bare, extra and barrier variants of one cell (empty when the backend has no such op)."""
    every = redis_ops(barrier) if backend == "redis" else sql_ops("%s", barrier)
    suffix = "" if op == "action" else f"/{op}"
    if f"barrier{suffix}" not in every:
        return {}
    return {name: every[f"{name}{suffix}"] for name in ("bare", "extra", "barrier")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per variant and cell, in slices")
    ap.add_argument("--slice", type=float, default=0.25, help="seconds per slice")
    ap.add_argument("--backends", default="mysql,postgres,redis")
    ap.add_argument("--threads", default="1,8")
    ap.add_argument("--ops", default="action", help="action, and/or compensate (SQL backends)")
    args = ap.parse_args()
    table = connectors()
    print(f"barrier overhead, {args.seconds:g} s per variant in {args.slice} s slices, ops/s (median slice). "
          "'extra' = bare plus")
    print("the statement the barrier adds (SQL: one INSERT into a uniquely keyed table; Redis: one more round trip).")
    print("Ratios are cost multiples, medians of the per-round ratios.")
    print(f"{'backend':20} {'threads':>7} {'bare':>8} {'extra':>8} {'barrier':>8} "
          f"{'barrier/bare':>13} {'barrier/extra':>14}")
    for backend in args.backends.split(","):
        connect, setup = table[backend]
        setup(8)
        for op in args.ops.split(","):
            ops = ops_for(backend, op)
            if not ops:
                continue
            name = backend if op == "action" else f"{backend}/{op}"
            for threads in (int(t) for t in args.threads.split(",")):
                rates = measure(threads, args.seconds, args.slice, connect, ops)
                b, e, w = (statistics.median(rates[k]) for k in ("bare", "extra", "barrier"))
                print(f"{name:20} {threads:7d} {b:8.0f} {e:8.0f} {w:8.0f} {cost(rates, 'barrier'):12.2f}x "
                      f"{cost(rates, 'barrier', 'extra'):13.2f}x", flush=True)


if __name__ == "__main__":
    main()
