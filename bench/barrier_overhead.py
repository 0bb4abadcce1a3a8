"""Barrier overhead per backend: the same business write, bare vs inside the barrier.

MariaDB and PostgreSQL: one UPDATE in its own transaction, bare, vs ``BranchBarrier.call`` (two
barrier INSERTs at most, here one: op=action has no origin op, plus the UPDATE, one commit).
Redis: one INCRBY, bare, vs the barrier's Lua script by SHA (one round trip). Each thread has its
own connection and its own row/key, so the figures show the barrier's cost, not lock contention.
Every barrier call uses a fresh gid, so each one takes the real insert path.

Usage: python bench/barrier_overhead.py [--seconds 2] [--backends mysql,postgres,redis]
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from typing import Any, Callable

from dtmcli.barrier import BranchBarrier, create_schema

MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "", "database": "test"}
PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"
_seq = itertools.count()


def fresh_barrier() -> BranchBarrier:
    return BranchBarrier("saga", f"bench{next(_seq)}-{threading.get_ident() % 100000}", "01", "action")


Op = Callable[[Any, int], None]


def sql_ops(placeholder: str) -> tuple[Op, Op, Op]:
    update = f"UPDATE bench_account SET balance = balance + 1 WHERE id = {placeholder}"
    insert = f"INSERT INTO bench_log (k) VALUES ({placeholder})"

    def bare(conn: Any, row: int) -> None:
        with conn.cursor() as cur:
            cur.execute(update, (row,))
        conn.commit()

    def with_barrier(conn: Any, row: int) -> None:
        def busi(c: Any) -> None:
            with c.cursor() as cur:
                cur.execute(update, (row,))

        fresh_barrier().call(conn, busi)

    def bare_plus_insert(conn: Any, row: int) -> None:
        with conn.cursor() as cur:
            cur.execute(insert, (f"k{next(_seq)}-{threading.get_ident()}",))
            cur.execute(update, (row,))
        conn.commit()

    return bare, bare_plus_insert, with_barrier


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


def measure(threads: int, seconds: float, connect: Callable[[], Any], op: Callable[[Any, int], None]) -> float:
    """Operations per second with ``threads`` workers, each on its own connection and row."""
    conns = [connect() for _ in range(threads)]
    counts = [0] * threads
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            op(conns[i], i)
            counts[i] += 1

    for i in range(threads):  # warm-up
        op(conns[i], i)
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return sum(counts) / elapsed


def backends() -> dict[str, Any]:
    import psycopg2
    import pymysql
    import redis

    def my() -> Any:
        return pymysql.connect(**MYSQL)

    def pg() -> Any:
        return psycopg2.connect(PG)

    def rd() -> Any:
        return redis.Redis(host="127.0.0.1", port=6379)

    def redis_bare(client: Any, row: int) -> None:
        client.incrby(f"bench:acct:{row}", 1)

    def redis_bare_plus_trip(client: Any, row: int) -> None:
        client.incrby(f"bench:acct:{row}", 1)
        client.exists(f"bench:other:{row}")

    def redis_barrier(client: Any, row: int) -> None:
        fresh_barrier().redis_check_adjust_amount(client, f"bench:acct:{row}", 1, 60)

    return {
        "mysql": (my, *sql_ops("%s"), lambda n: setup_sql(my, n)),
        "postgres": (pg, *sql_ops("%s"), lambda n: setup_sql(pg, n)),
        "redis": (rd, redis_bare, redis_bare_plus_trip, redis_barrier,
                  lambda n: [rd().set(f"bench:acct:{i}", 10**9) for i in range(n)]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--backends", default="mysql,postgres,redis")
    ap.add_argument("--threads", default="1,8")
    args = ap.parse_args()
    table = backends()
    print(f"barrier overhead, {args.seconds:.0f} s per cell, ops/s. 'extra' = bare plus the statement the barrier")
    print("adds (SQL: one INSERT into a uniquely keyed table; Redis: one more round trip). Ratios are cost multiples.")
    print(f"{'backend':9} {'threads':>7} {'bare':>8} {'extra':>8} {'barrier':>8} "
          f"{'barrier/bare':>13} {'barrier/extra':>14}")
    for name in args.backends.split(","):
        connect, bare, extra, with_barrier, setup = table[name]
        setup(8)
        for threads in (int(t) for t in args.threads.split(",")):
            b = measure(threads, args.seconds, connect, bare)
            e = measure(threads, args.seconds, connect, extra)
            w = measure(threads, args.seconds, connect, with_barrier)
            print(f"{name:9} {threads:7d} {b:8.0f} {e:8.0f} {w:8.0f} {b / w:12.2f}x {e / w:13.2f}x")


if __name__ == "__main__":
    main()
