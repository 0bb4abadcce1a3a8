"""Helpers for the coordinator tests (fixtures come from the dtmcli pytest plugin)."""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
import requests

from dtmcli.testing import DtmTestServer


class Api:
    """Raw calls to the coordinator's HTTP API."""

    def __init__(self, server: DtmTestServer) -> None:
        self.server = server
        self.session = requests.Session()

    def post(self, name: str, body: Any = None, raw: Optional[bytes] = None) -> requests.Response:
        data = raw if raw is not None else json.dumps(body).encode()
        return self.session.post(f"{self.server.url}/{name}", data=data, timeout=10,
                                 headers={"Content-Type": "application/json"})

    def get(self, name: str, **params: str) -> requests.Response:
        return self.session.get(f"{self.server.url}/{name}", params=params, timeout=10)

    def query(self, gid: str) -> Any:
        return self.get("query", gid=gid).json()


@pytest.fixture
def api(dtm_server: DtmTestServer) -> Any:
    client = Api(dtm_server)
    yield client
    client.session.close()


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Any:
    """Every server, worker and connection thread a test started must be gone after it."""
    import threading
    import time

    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
