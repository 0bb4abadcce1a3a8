"""Locks and checks that no other test noticed (issue 9.14): each test here fails when its guard is removed.

- ``DtmClient.for_url``: one shared client per address, also when first used from many threads.
- ``ManualClock``: concurrent ``advance`` calls lose no time; it never goes backwards.
- The coordinator's stores: a gid is stored once with a unique sequence number under concurrent
  ``add``; the SQLite store's shared connection survives concurrent writes.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest
from races import race

import dtmcli.client
from dtmcli import DtmClient, local_gid
from dtmcli.testing import _clock, _store
from dtmcli.testing._clock import ManualClock
from dtmcli.testing._store import MemoryStore, SqliteStore, TransRecord


def test_for_url_gives_every_thread_the_same_client() -> None:
    for i in range(3):
        url = f"http://127.0.0.1:9/race{i}-{local_gid()}/api/dtmsvr"
        try:
            got = race(lambda url=url: DtmClient.for_url(url), threads=8, slow=[dtmcli.client])
            assert len({id(c) for c in got}) == 1
            assert DtmClient.for_url(url) is got[0]
        finally:
            DtmClient.close_shared(url)


def test_manual_clock_concurrent_advances_add_up() -> None:
    clock = ManualClock(start=1000.0)
    race(lambda: [clock.advance(1) for _ in range(10)], threads=8, slow=[_clock])
    assert clock.now() == 1080.0


def test_manual_clock_never_goes_backwards() -> None:
    clock = ManualClock(start=1000.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
    clock.set(999.0)
    assert clock.now() == 1000.0
    clock.set(1005.5)
    assert clock.now() == 1005.5


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_store_adds_a_gid_once_with_unique_sequence_numbers(kind: str, tmp_path: Path) -> None:
    store = MemoryStore() if kind == "memory" else SqliteStore(str(tmp_path / "dtm.sqlite"))
    try:
        gid = local_gid()
        added = race(lambda: store.add(TransRecord(gid=gid, trans_type="saga", status="prepared")),
                     threads=8, slow=[_store])
        assert sorted(added) == [False] * 7 + [True]
        counter = itertools.count()
        others = race(lambda: [store.add(TransRecord(gid=f"{gid}-{next(counter)}", trans_type="msg",
                                                     status="prepared")) for _ in range(5)],
                      threads=8, slow=[_store])
        assert all(all(chunk) for chunk in others)
        seqs = [r.seq for r in store.records()]
        assert sorted(seqs) == list(range(1, 42))
    finally:
        store.close()


def test_sqlite_store_survives_concurrent_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "dtm.sqlite")
    store = SqliteStore(path)
    gids = [local_gid() for _ in range(8)]
    for gid in gids:
        store.add(TransRecord(gid=gid, trans_type="saga", status="prepared"))
    records = {r.gid: r for r in store.records()}
    turn = itertools.count()

    def save_all() -> None:
        rec = records[gids[next(turn) % len(gids)]]
        for status in ("submitted", "succeed"):
            rec.status = status
            store.save(rec)

    race(save_all, threads=8, slow=[_store])
    store.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT count(*) FROM dtm_trans WHERE body LIKE '%\"status\":\"succeed\"%'").fetchone()
    assert rows == (8,)
    reopened = SqliteStore(path)
    try:
        assert {r.gid: r.status for r in reopened.records()} == dict.fromkeys(gids, "succeed")
    finally:
        reopened.close()
