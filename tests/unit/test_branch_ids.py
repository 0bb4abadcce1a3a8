"""Branch id allocation under thread races (issue 9.14: these fail when the lock is removed)."""

from __future__ import annotations

import pytest
from races import race

from dtmcli._ids import BranchIdGenerator
from dtmcli.errors import DtmInvalidInput


@pytest.mark.parametrize("parent", ["", "03"])
def test_raced_ids_are_unique_and_dense(parent: str) -> None:
    for _ in range(5):
        gen = BranchIdGenerator(parent)
        got = race(lambda gen=gen: [gen.next() for _ in range(12)], threads=8, slow=[BranchIdGenerator.next])
        ids = [i for chunk in got for i in chunk]
        assert sorted(ids) == [f"{parent}{n:02d}" for n in range(1, 97)]
        for chunk in got:  # each thread sees its own ids in increasing order
            assert chunk == sorted(chunk)


def test_raced_limit_hands_out_exactly_99() -> None:
    gen = BranchIdGenerator()

    def take() -> tuple[list[str], int]:
        ids, refused = [], 0
        for _ in range(15):
            try:
                ids.append(gen.next())
            except DtmInvalidInput:
                refused += 1
        return ids, refused

    got = race(take, threads=8, slow=[BranchIdGenerator.next])
    ids = [i for chunk, _ in got for i in chunk]
    assert sorted(ids) == [f"{n:02d}" for n in range(1, 100)]
    assert sum(refused for _, refused in got) == 8 * 15 - 99
