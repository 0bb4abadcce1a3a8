"""Barrier latency per call against the statements it cannot avoid, one driver at a time, 1 thread.

Variants, interleaved call by call so that a change in the machine's load hits all of them alike:

* ``bare``: the business write alone (one UPDATE, then COMMIT; psycopg2 and psycopg send their own
  BEGIN first).
* ``+insert``: bare plus the one barrier row an action inserts (the barrier's own INSERT IGNORE /
  ON CONFLICT DO NOTHING into the barrier table, fresh key): the least any barrier must add.
* ``+insert+check`` (MySQL family): that, with the COMMIT replaced by the checked COMMIT the barrier
  sends on MariaDB (the row still there, else refuse: InnoDB rolls a deadlocked transaction back
  under business code that may catch the error).
* ``barrier``: ``BranchBarrier.call`` with op=action, the same UPDATE as business function.

The last plain-statement variant is the floor: the statements the barrier sends, written by hand.
``barrier / floor`` is what dtmcli adds on top of them (its Python, the driver calls it makes).
Reported: p10 and p50 of the wall time per call, client CPU per call (thread CPU time), ratios.

Usage: python bench/barrier_latency.py [--n 2000] [--drivers pymysql,psycopg2,psycopg]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any, Callable

from barrier_overhead import MYSQL, PG  # the same local databases

from dtmcli._barrier.sql import _checked_commit_sql
from dtmcli.barrier import BranchBarrier, create_schema

TABLE = "dtm_barrier.barrier"
COLUMNS = "(trans_type, gid, branch_id, op, barrier_id, reason)"
UPDATE = "UPDATE bench_lat_account SET balance = balance + 1 WHERE id = %s"
_seq = itertools.count()


def fresh_gid() -> str:
    return f"blat{next(_seq)}-{time.time_ns() % 10**12}"


def connect(driver: str) -> Any:
    if driver == "pymysql":
        import pymysql

        return pymysql.connect(**MYSQL)
    if driver == "psycopg2":
        import psycopg2

        return psycopg2.connect(PG)
    import psycopg

    return psycopg.connect(PG)


def variants(conn: Any, mysql: bool) -> dict[str, Callable[[], None]]:
    insert = (f"insert ignore into {TABLE}{COLUMNS} values(%s, %s, %s, %s, %s, %s)" if mysql else
              f"insert into {TABLE}{COLUMNS} values(%s, %s, %s, %s, %s, %s) "
              "on conflict (gid, branch_id, op, barrier_id) do nothing")
    checked = _checked_commit_sql(TABLE, by_id=True)

    def busi(c: Any) -> None:
        cur = c.cursor()
        try:
            cur.execute(UPDATE, (1,))
        finally:
            cur.close()

    def bare() -> None:
        busi(conn)
        conn.commit()

    def with_insert(check: bool) -> Callable[[], None]:
        def call() -> None:
            gid = fresh_gid()
            cur = conn.cursor()
            try:
                cur.execute(insert, ("saga", gid, "01", "action", "01", "action"))
                row_id = getattr(cur, "lastrowid", None)  # MySQL: the row check's id
                cur.execute(UPDATE, (1,))
                if check:
                    cur.execute(checked, (row_id, gid, "01", "action", "01"))
            finally:
                cur.close()
            if not check:
                conn.commit()

        return call

    def barrier() -> None:
        BranchBarrier("saga", fresh_gid(), "01", "action").call(conn, busi)

    out = {"bare": bare, "+insert": with_insert(False)}
    if mysql:
        out["+insert+check"] = with_insert(True)
    out["barrier"] = barrier
    return out


def setup(conn: Any) -> None:
    create_schema(conn)
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS bench_lat_account")
    cur.execute("CREATE TABLE bench_lat_account (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
    cur.execute("INSERT INTO bench_lat_account VALUES (1, 0)")
    cur.close()
    conn.commit()


def cleanup(conn: Any) -> None:
    cur = conn.cursor()
    cur.execute(f"DELETE FROM {TABLE} WHERE gid LIKE %s", ("blat%",))
    cur.execute("DROP TABLE IF EXISTS bench_lat_account")
    cur.close()
    conn.commit()


def measure(driver: str, n: int) -> None:
    conn = connect(driver)
    mysql = driver == "pymysql"
    setup(conn)
    calls = variants(conn, mysql)
    for call in calls.values():  # warm up: the barrier's once-per-table check, statement caches
        for _ in range(20):
            call()
    wall: dict[str, list[int]] = {k: [] for k in calls}
    cpu: dict[str, list[int]] = {k: [] for k in calls}
    for _ in range(n):
        for name, call in calls.items():
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            call()
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            wall[name].append(t1 - t0)
            cpu[name].append(c1 - c0)
    cleanup(conn)
    conn.close()
    names = list(calls)
    floor = names[-2]
    p50 = {k: sorted(v)[n // 2] for k, v in wall.items()}
    print(f"\n{driver}: {n} calls of each variant, interleaved; floor = {floor}")
    print(f"{'variant':15} {'p10 us':>8} {'p50 us':>8} {'cpu us':>8} {'p50/bare':>9} {'p50/floor':>10}")
    for name in names:
        p10 = sorted(wall[name])[n // 10] / 1000
        mean_cpu = statistics.fmean(cpu[name]) / 1000
        print(f"{name:15} {p10:8.0f} {p50[name] / 1000:8.0f} {mean_cpu:8.0f} {p50[name] / p50['bare']:8.2f}x "
              f"{p50[name] / p50[floor]:9.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="calls of each variant")
    ap.add_argument("--drivers", default="pymysql,psycopg2,psycopg")
    args = ap.parse_args()
    for driver in args.drivers.split(","):
        measure(driver, args.n)


if __name__ == "__main__":
    main()
