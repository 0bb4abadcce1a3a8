"""Fixtures for the ``dtmcli`` command line tests: a coordinator, branch services, a runner."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from dtmcli import Saga, local_gid
from dtmcli.cli import main
from dtmcli.testing import BranchService, DtmTestServer
from dtmcli.testing._clock import ManualClock


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli:
    """Runs ``dtmcli`` in process against one coordinator (``--dtm`` added unless ``dtm=None``)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, *argv: str, dtm: str | None = "default", stdin: str = "") -> Result:
        out, err = io.StringIO(), io.StringIO()
        args = list(argv)
        if dtm is not None:
            args += ["--dtm", self.url if dtm == "default" else dtm]
        code = main(args, stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def dtm() -> Iterator[DtmTestServer]:
    # Started two hours in the past so a test can make "old" transactions, then move to now.
    with DtmTestServer(clock=ManualClock(time.time() - 7200)) as server:
        yield server


@pytest.fixture
def busi() -> Iterator[BranchService]:
    with BranchService() as service:
        yield service


@pytest.fixture
def cli(dtm: DtmTestServer) -> Cli:
    return Cli(dtm.url)


def saga(dtm: DtmTestServer, busi: BranchService, second: str = "/b", *, wait: bool = True) -> str:
    """Submit a two-branch saga; the second action is ``second`` (route it to make it fail or hang)."""
    gid = local_gid()
    Saga(dtm.url, gid).add(busi.url("/a"), busi.url("/a-c"), {"n": 1}).add(
        busi.url(second), busi.url("/b-c"), {"n": 2}
    ).submit()
    if wait:
        dtm.wait_idle()
    return gid
