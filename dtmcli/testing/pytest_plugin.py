"""pytest plugin for dtmcli: ``--dtm-server URL`` and fixtures for the in-process coordinator.

Fixtures:

- ``dtm_server``: a started :class:`DtmTestServer` with the manual clock (function scope).
- ``dtm``: a :class:`DtmFacade` for end-to-end tests, backed by the in-process coordinator, or by
  the real server given with ``--dtm-server`` / ``DTM_SERVER``.
- ``branch_service``: a started :class:`BranchService` for scripted branch answers.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from .branch_service import BranchService
from .facade import DtmFacade
from .server import DtmTestServer


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--dtm-server URL`` (also read from ``DTM_SERVER``)."""
    parser.addoption(
        "--dtm-server",
        default=os.environ.get("DTM_SERVER", ""),
        help="run end-to-end tests against this real DTM server (e.g. http://localhost:36789/api/dtmsvr)",
    )


@pytest.fixture
def dtm_server() -> Iterator[DtmTestServer]:
    """The in-process coordinator with a manual clock (move it with ``advance``)."""
    with DtmTestServer() as server:
        yield server


@pytest.fixture
def dtm(request: pytest.FixtureRequest) -> Iterator[DtmFacade]:
    """A coordinator for end-to-end tests: the real ``--dtm-server`` when given, else in process."""
    url = str(request.config.getoption("--dtm-server") or "")
    if url:
        facade = DtmFacade(url=url)
        try:
            yield facade
        finally:
            facade.close()
        return
    with DtmTestServer() as server:
        facade = DtmFacade(server=server)
        try:
            yield facade
        finally:
            facade.close()


@pytest.fixture
def branch_service() -> Iterator[BranchService]:
    """A scripted HTTP branch service on 127.0.0.1."""
    with BranchService() as service:
        yield service
