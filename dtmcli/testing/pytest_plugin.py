"""pytest plugin for dtmcli: ``--dtm-server URL`` and fixtures for the in-process coordinator.

Opt-in, so that installing the SDK in a service does not add options or fixtures to its test suite:
put ``pytest_plugins = ["dtmcli.testing.pytest_plugin"]`` in the root ``conftest.py`` (or run
``pytest -p dtmcli.testing.pytest_plugin``). When the project already defines ``--dtm-server``, its
option is left alone and the ``dtm`` fixture reads only ``DTM_SERVER``.

Fixtures:

- ``dtm_server``: a started :class:`DtmTestServer` with the manual clock (function scope).
- ``dtm``: a :class:`DtmFacade` for end-to-end tests, backed by the in-process coordinator, or by
  the real server given with ``--dtm-server`` / ``DTM_SERVER``.
- ``dtm_grpc``: the same, serving DTM's gRPC API too (``dtm_grpc.grpc_target``; the ``grpc`` extra):
  in process, or the real server's ``--dtm-grpc-server host:port`` / ``DTM_GRPC_SERVER`` (with
  ``--dtm-server`` for its HTTP API, which queries need).
- ``branch_service``: a started :class:`BranchService` for scripted branch answers.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from .branch_service import BranchService
from .facade import DtmFacade
from .server import DtmTestServer

_DEST = "dtmcli_dtm_server"  # our own dest, so a project's --dtm-server is never read by mistake
_GRPC_DEST = "dtmcli_dtm_grpc_server"


def _add_dtm_server_option(parser: pytest.Parser) -> None:
    """Add ``--dtm-server URL`` (also read from ``DTM_SERVER``) unless the project defines it already."""
    try:
        parser.addoption(
            "--dtm-server",
            dest=_DEST,
            default="",
            help="run end-to-end tests against this real DTM server (e.g. http://localhost:36789/api/dtmsvr)",
        )
    except ValueError:  # "option names {'--dtm-server'} already added": the project's own option wins
        pass
    try:
        parser.addoption(
            "--dtm-grpc-server",
            dest=_GRPC_DEST,
            default="",
            help="the real DTM server's gRPC API (host:port, e.g. localhost:36790) for the dtm_grpc fixture",
        )
    except ValueError:
        pass


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """Loaded from a conftest's ``pytest_plugins``: the project's own options exist already."""
    if any(str(getattr(p, "__file__", "")).endswith("conftest.py") for p in pluginmanager.get_plugins()):
        _add_dtm_server_option(parser)


@pytest.hookimpl(hookwrapper=True)
def pytest_load_initial_conftests(parser: pytest.Parser) -> Iterator[None]:
    """Loaded with ``-p`` (before any conftest): add the option once the root conftests have added theirs."""
    yield
    _add_dtm_server_option(parser)


def _server_url(config: pytest.Config) -> str:
    return str(config.getoption(_DEST, default="") or os.environ.get("DTM_SERVER", ""))


@pytest.fixture
def dtm_server() -> Iterator[DtmTestServer]:
    """The in-process coordinator with a manual clock (move it with ``advance``)."""
    with DtmTestServer() as server:
        yield server


@pytest.fixture
def dtm(request: pytest.FixtureRequest) -> Iterator[DtmFacade]:
    """A coordinator for end-to-end tests: the real ``--dtm-server`` when given, else in process."""
    url = _server_url(request.config)
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
def dtm_grpc(request: pytest.FixtureRequest) -> Iterator[DtmFacade]:
    """A coordinator serving DTM's gRPC API too: the real ``--dtm-grpc-server`` when given, else in process."""
    target = str(request.config.getoption(_GRPC_DEST, default="") or os.environ.get("DTM_GRPC_SERVER", ""))
    if target:
        url = _server_url(request.config)
        if not url:
            raise pytest.UsageError("--dtm-grpc-server needs --dtm-server (the same DTM's HTTP API) as well")
        facade = DtmFacade(url=url, grpc_target=target)
        try:
            yield facade
        finally:
            facade.close()
        return
    with DtmTestServer(grpc_port=0) as server:
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
