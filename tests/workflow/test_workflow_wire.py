"""Workflow wire: what the sync and async clients send, pinned to the Go client's recorded exchanges.

A local server replays DTM's and the branches' recorded answers from tests/data/traces/workflow_*.json
in order and records what the client sent: every prepareWorkflow, registerBranch and submit body and
every step/callback call (method, path, query, body, Content-Type) must equal the Go client's. Two
deliberate differences: our registerBranch carries ``"sync":"1"`` (protocol.md §12), and a failed
step's error, hence the rollback reason, is the recorded text plus " FAILURE" (what Go's replay of that
step raises) where Go's fresh run has its own error text (``Post "<url>": <body> FAILURE`` or the
``Do`` error): a resumed run must take the same path as the fresh one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterator
from urllib.parse import parse_qsl, urlsplit

import pytest
import traces
from web_servers import serve_http

import dtmcli.asyncio.workflow as aworkflow
from dtmcli import DtmClient, DtmFailure, DtmServerError, workflow
from dtmcli.asyncio import AsyncDtmClient

WORKFLOW_TRACES = [
    "workflow_success",
    "workflow_rollback",
    "workflow_rollback_sync",
    "workflow_rollback_compensate_error_branch",
    "workflow_resume",
    "workflow_resume_sync",
    "workflow_do_local",
    "workflow_do_local_sync",
    "workflow_do_failure",
]


class Replay:
    """The recorded client->dtm / client->branch events of a trace, answered in order."""

    def __init__(self, name: str, port: int) -> None:
        text = json.dumps(traces.load(name)["events"]).replace("127.0.0.1:PORT", f"127.0.0.1:{port}")
        self.expected = [
            e for e in json.loads(text)
            if e["kind"] in ("client->dtm", "client->branch") and not e["request"]["path"].endswith("/query")
        ]
        self.resumes = [e for e in json.loads(text) if e["kind"] == "dtm->branch"]
        failed = [e["request"]["body"]["data"] for e in self.expected
                  if e["request"]["path"].endswith("/registerBranch") and e["request"]["body"]["status"] == "failed"]
        self.failure_text = f"{failed[0]} FAILURE" if failed else ""
        self.sent: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def answer(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, bytes]:
        parts = urlsplit(target)
        with self.lock:
            index = len(self.sent)
            self.sent.append({"method": method, "path": parts.path, "query": dict(parse_qsl(parts.query)),
                              "content_type": headers.get("Content-Type"), "body": body})
        if index >= len(self.expected):
            return 599, b'{"message":"unexpected request"}'
        resp = self.expected[index]["response"]
        payload = resp["body"]
        raw = payload.encode() if isinstance(payload, str) else json.dumps(payload, separators=(",", ":")).encode()
        return int(resp["status"]), raw

    def check(self) -> None:
        got = [(s["method"], s["path"]) for s in self.sent]
        want = [(e["request"]["method"], e["request"]["path"]) for e in self.expected]
        assert got == want
        for sent, event in zip(self.sent, self.expected):
            req = event["request"]
            if event["kind"] == "client->dtm":
                assert sent["content_type"] == "application/json"
                body = json.loads(sent["body"])
                if req["path"].endswith("/registerBranch"):
                    assert body.pop("sync") == "1", "workflow registerBranch must ask DTM to store it now"
                want = req["body"]
                if req["path"].endswith("/submit") and want["req_extra"]["status"] == "failed":
                    assert want["req_extra"]["rollback_reason"] != self.failure_text  # Go's own text
                    want = {**want, "req_extra": {**want["req_extra"], "rollback_reason": self.failure_text}}
                assert body == want, req["path"]
            else:
                assert sent["query"] == req["query"], req["path"]
                assert sent["body"].decode() == req["body"], req["path"]
                assert sent["content_type"] == req["headers"].get("Content-Type"), req["path"]


@pytest.fixture
def replay_server() -> Iterator[Callable[[str], Replay]]:
    state: dict[str, Replay] = {}

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, raw = state["replay"].answer(self.command, self.path, self.headers, body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler) as server:
        port = server.server_address[1]

        def start(name: str) -> Replay:
            state["replay"] = Replay(name, port)
            return state["replay"]

        start.port = port  # type: ignore[attr-defined]
        yield start


def _input(replay: Replay) -> tuple[bytes, str]:
    custom = json.loads(replay.expected[0]["request"]["body"]["custom_data"])
    return base64.b64decode(custom["data"]), custom["name"]


def _options(name: str) -> dict[str, Any]:
    if name == "wf_http_ceb":
        return {"compensate_error_branch": True}
    if name == "wf_http_resume":
        return {"timeout_to_fail": 3}
    return {}


def sync_workflow(name: str, busi: str) -> Callable[[workflow.Workflow, bytes], bytes | None]:
    """The Go program's workflow ``name``, written with the sync API."""

    def fn(wf: workflow.Workflow, data: bytes) -> bytes | None:
        req = json.loads(data)
        base, amount = busi + req["prefix"], {"amount": req["amount"]}
        if name == "wf_do":
            wf.new_branch().on_commit(
                lambda bb: wf.request("POST", f"{base}/commit1", json={"note": "commit of a local step"})
            )
            r1 = wf.do(lambda bb: b'{"local":"done","amount":30}')
            wf.new_branch().do(lambda bb: b"local failure text")
            r3 = wf.new_branch().request("POST", f"{base}/a3", json=amount)
            return b'{"step1":' + r1 + b',"step3":' + r3.content + b"}"
        if name == "wf_do_fail":
            wf.new_branch().on_rollback(lambda bb: wf.request("POST", f"{base}/c1"))
            wf.do(lambda bb: b'{"reserved":true}')

            def no_stock(bb: Any) -> bytes:
                raise workflow.StepFailure("out of stock", data=b"stock check said no")

            wf.new_branch().do(no_stock)
            return None
        for i in (1, 2):
            wf.new_branch().on_rollback(lambda bb, i=i: wf.request("POST", f"{base}/c{i}", json=amount))
            wf.request("POST", f"{base}/a{i}", json=amount)
        return None

    return fn


def async_workflow(name: str, busi: str) -> Callable[..., Any]:
    """The same workflow with the asyncio API."""

    async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes | None:
        req = json.loads(data)
        base, amount = busi + req["prefix"], {"amount": req["amount"]}
        if name == "wf_do":

            async def commit(bb: Any) -> None:
                await wf.request("POST", f"{base}/commit1", json={"note": "commit of a local step"})

            wf.new_branch().on_commit(commit)
            r1 = await wf.do(lambda bb: b'{"local":"done","amount":30}')

            async def local(bb: Any) -> bytes:
                return b"local failure text"

            await wf.new_branch().do(local)
            r3 = await wf.new_branch().request("POST", f"{base}/a3", json=amount)
            return b'{"step1":' + r1 + b',"step3":' + r3.content + b"}"
        if name == "wf_do_fail":
            wf.new_branch().on_rollback(lambda bb: wf.request("POST", f"{base}/c1"))  # a coroutine, awaited
            await wf.do(lambda bb: b'{"reserved":true}')

            async def no_stock(bb: Any) -> bytes:
                raise aworkflow.StepFailure("out of stock", data=b"stock check said no")

            await wf.new_branch().do(no_stock)
            return None
        for i in (1, 2):

            async def compensate(bb: Any, i: int = i) -> None:
                await wf.request("POST", f"{base}/c{i}", json=amount)

            wf.new_branch().on_rollback(compensate)
            await wf.request("POST", f"{base}/a{i}", json=amount)
        return None

    return fn


def _expected_outcome(name: str) -> tuple[str, str]:
    """What the Go client's ExecuteCtx returned (from the trace notes): ("ok", result) or ("failure", text)."""
    notes = traces.load(name)["notes"]
    returned = [n for n in notes if n.startswith("ExecuteCtx returned: ")]
    if not returned:
        return "resume", ""
    text = returned[0][len("ExecuteCtx returned: "):]
    if text == "<nil>":
        return "ok", ""
    if text.startswith("result="):
        return "ok", text[len("result="):].rsplit(" err=", 1)[0]
    return "failure", text


@pytest.mark.parametrize("trace", WORKFLOW_TRACES)
def test_sync_client_sends_what_the_go_client_sends(trace: str, replay_server: Any) -> None:
    replay = replay_server(trace)
    busi = f"http://127.0.0.1:{replay_server.port}"
    data, name = _input(replay)
    dtm = DtmClient(f"{busi}/api/dtmsvr")
    workflow.init_http(dtm, f"{busi}/wf/resume")
    workflow.register(name, sync_workflow(name, busi), **_options(name))
    try:
        kind, expected = _expected_outcome(trace)
        if kind == "resume":
            with pytest.raises(DtmServerError, match="temporarily unavailable"):
                workflow.execute(name, "GID", data)
            (resume,) = replay.resumes
            assert workflow.execute_by_qs(resume["request"]["query"], resume["request"]["body"].encode()) == b""
        elif kind == "failure":
            with pytest.raises(DtmFailure) as info:
                workflow.execute(name, "GID", data)
            assert expected and info.value.message == replay.failure_text
        else:
            assert workflow.execute(name, "GID", data) == expected.encode()
            if trace.startswith("workflow_do_local"):  # the finished gid again: only prepareWorkflow
                assert workflow.execute(name, "GID", data) == expected.encode()
        replay.check()
    finally:
        workflow.unregister(name)
        dtm.close()


@pytest.mark.parametrize("trace", WORKFLOW_TRACES)
def test_async_client_sends_what_the_go_client_sends(trace: str, replay_server: Any) -> None:
    replay = replay_server(trace)
    busi = f"http://127.0.0.1:{replay_server.port}"
    data, name = _input(replay)
    aworkflow.register(name, async_workflow(name, busi), **_options(name))

    async def main() -> None:
        async with AsyncDtmClient(f"{busi}/api/dtmsvr") as dtm:
            aworkflow.init_http(dtm, f"{busi}/wf/resume")
            kind, expected = _expected_outcome(trace)
            if kind == "resume":
                with pytest.raises(DtmServerError, match="temporarily unavailable"):
                    await aworkflow.execute(name, "GID", data)
                (resume,) = replay.resumes
                query, body = resume["request"]["query"], resume["request"]["body"].encode()
                assert await aworkflow.execute_by_qs(query, body) == b""
            elif kind == "failure":
                with pytest.raises(DtmFailure) as info:
                    await aworkflow.execute(name, "GID", data)
                assert expected and info.value.message == replay.failure_text
            else:
                assert await aworkflow.execute(name, "GID", data) == expected.encode()
                if trace.startswith("workflow_do_local"):
                    assert await aworkflow.execute(name, "GID", data) == expected.encode()

    try:
        asyncio.run(main())
        replay.check()
    finally:
        aworkflow.unregister(name)


def test_resume_trace_carries_what_execute_by_qs_reads() -> None:
    (resume,) = [e for e in traces.load("workflow_resume_sync")["events"] if e["kind"] == "dtm->branch"]
    assert resume["request"]["query"] == {"branch_id": "00", "gid": "GID", "op": "wf_http_resume",
                                          "trans_type": "workflow"}
