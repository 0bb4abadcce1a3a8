"""A scripted DTM (and branch) transport for workflow tests that need no sockets."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any, Callable, Iterator, Mapping, Optional

from dtmcli import DtmClient, workflow
from dtmcli._protocol import Response

PREPARED_ANSWER: dict[str, Any] = {"transaction": {"status": "prepared", "trans_type": "workflow"}, "progresses": []}
DTM = "http://dtm.test/api/dtmsvr"
BUSI = "http://busi.test"


def progress(branch_id: str, op: str, status: str, data: bytes = b"") -> dict[str, Any]:
    """A progress row as DTM lists it (``bin_data`` absent when the data is empty)."""
    row: dict[str, Any] = {"branch_id": branch_id, "op": op, "status": status, "gid": "G"}
    if data:
        row["bin_data"] = base64.b64encode(data).decode()
    return row


def custom(name: str, data: bytes) -> str:
    """custom_data as Go writes it."""
    return json.dumps({"data": base64.b64encode(data).decode(), "name": name}, separators=(",", ":"))


def prepared(*rows: dict[str, Any], **trans: Any) -> dict[str, Any]:
    """A /query answer: a prepared workflow (``trans`` fields added) with these progress rows."""
    return {"transaction": {"status": "prepared", "trans_type": "workflow", **trans}, "progresses": list(rows)}


class FakeDtm:
    """Answers prepareWorkflow with ``prepare`` (a JSON object), registerBranch/submit with SUCCESS, and
    branch URLs with ``branches[url]`` (status, body) or a callable raising; records every call."""

    timeout = 5.0

    def __init__(self, prepare: Optional[Mapping[str, Any]] = None) -> None:
        self.prepare: Mapping[str, Any] = prepare or PREPARED_ANSWER
        self.branches: dict[str, Any] = {}
        self.calls: list[tuple[str, str, Optional[Mapping[str, str]], Any]] = []
        self.on_call: Optional[Callable[[str], None]] = None

    def _answer(self, method: str, url: str, params: Any, body: Optional[bytes]) -> Response:
        parsed: Any = body
        if url.startswith(DTM):
            parsed = json.loads(body) if body else None
        self.calls.append((method, url, dict(params) if params else None, parsed))
        if self.on_call is not None:
            self.on_call(url)
        if url == f"{DTM}/prepareWorkflow":
            return Response(200, json.dumps(self.prepare).encode())
        if url.startswith(DTM):
            return Response(200, b'{"dtm_result":"SUCCESS"}')
        answer = self.branches.get(url, (200, b'{"dtm_result":"SUCCESS"}'))
        if callable(answer):
            answer = answer()
        return Response(answer[0], answer[1])

    def request(self, method: str, url: str, *, params: Any = None, body: Optional[bytes] = None,
                headers: Any = None, timeout: Any = None) -> Response:
        return self._answer(method, url, params, body)

    def refuse(self, path: str, status: int, body: bytes, then: Mapping[str, Any]) -> None:
        """DTM's ``path`` answers ``status``/``body`` from now on; every prepareWorkflow after it answers ``then``."""
        original = self._answer

        def answer(method: str, url: str, params: Any, body_: Optional[bytes]) -> Response:
            if url.endswith(f"/{path}"):
                self.calls.append((method, url, None, json.loads(body_ or b"{}")))
                self.prepare = then
                return Response(status, body)
            return original(method, url, params, body_)

        self._answer = answer  # type: ignore[method-assign]

    def close(self) -> None:
        pass

    def paths(self) -> list[str]:
        """The calls as ``METHOD path`` (DTM paths without the base)."""
        return [f"{m} {u.replace(DTM + '/', '').replace(BUSI, '')}" for m, u, _, _ in self.calls]

    def bodies(self, path: str) -> list[Any]:
        """The JSON bodies sent to DTM's ``path``."""
        return [b for _, u, _, b in self.calls if u == f"{DTM}/{path}"]


class AsyncFakeDtm(FakeDtm):
    """The same, awaited (for AsyncDtmClient)."""

    async def request(self, method: str, url: str, *, params: Any = None,  # type: ignore[override]
                      body: Optional[bytes] = None, headers: Any = None, timeout: Any = None) -> Response:
        return self._answer(method, url, params, body)

    async def aclose(self) -> None:
        pass


@contextlib.contextmanager
def installed(name: str, callback: str) -> Iterator[FakeDtm]:
    """A FakeDtm as the blocking workflow module's DTM (``init_http``); workflow ``name`` unregistered after."""
    dtm = FakeDtm()
    workflow.init_http(DtmClient(DTM, transport=dtm), callback)  # type: ignore[arg-type]
    try:
        yield dtm
    finally:
        workflow.unregister(name)
