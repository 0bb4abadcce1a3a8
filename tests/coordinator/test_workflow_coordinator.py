"""Workflow mode in the embedded coordinator, checked against the nine recorded DTM v1.19.0 workflow traces.

Each trace's client->dtm requests (the Go client's exact bodies) are sent again over real HTTP; the
coordinator's answers and its callbacks (the resume call to ``query_prepared``) must be the recorded
ones. A resume call is answered by a scripted branch route that, like the Go resume handler, sends the
requests that followed it in the trace before answering. ``*_sync`` traces come from a server with
``UpdateBranchSync: 1`` (``update_branch_sync=True`` here); the same requests with ``"sync": "1"`` store
progress on a default server, and without either nothing is stored (boltdb).

Then the rules the traces do not show, from DTM's source (see ``dtmcli/testing/_workflow.py``): when
the resume cron runs (``next_cron_interval`` after prepareWorkflow, then every server RetryInterval,
whatever the resume URL answers, never failing the workflow), the exact resume request, the SQL
column limits, duplicate and concurrent registerBranch, errors, and persistence.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

import pytest
import requests
from traces import TRACES, load

from dtmcli.testing import Answer, BranchService, Call, DtmTestServer
from dtmcli.testing._branch_client import BranchAnswer

from .conftest import Api
from .test_trace_replay import _callback, _recorded, _sub

WF_TRACES = sorted(p.stem for p in TRACES.glob("workflow_*.json"))
if len(WF_TRACES) != 9:  # an empty parameter set would silently skip every replay
    raise RuntimeError(f"expected the 9 workflow traces in {TRACES}, found {len(WF_TRACES)}")
SYNC_TRACES = [n for n in WF_TRACES if n.endswith("_sync")]
INPUT = b'{"prefix":"/wm","amount":30}'


def _norm(value: Any) -> Any:
    """Every non-null ``*_time`` becomes ``TS``, as in the traces."""
    if isinstance(value, dict):
        return {k: ("TS" if k.endswith("_time") and v is not None else _norm(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _forget_progress(body: Any) -> Any:
    """A workflow answer as a server that stored no progress gives it."""
    if isinstance(body, dict):
        return {k: ([] if k in ("progresses", "branches") else v) for k, v in body.items()}
    return body


def _with_sync(event: dict[str, Any]) -> dict[str, Any]:
    r = event["request"]
    if r["path"].endswith("/registerBranch"):
        return {**event, "request": {**r, "body": {**r["body"], "sync": "1"}}}
    return event


class WorkflowReplay:
    """Sends a trace's client->dtm requests and compares the answers (ports and times normalised)."""

    def __init__(
        self,
        dtm: DtmTestServer,
        svc: BranchService,
        name: str,
        mutate: Callable[[dict[str, Any]], dict[str, Any]],
        expect: Callable[[Any], Any],
    ) -> None:
        self.dtm, self.svc, self.name = dtm, svc, name
        self.mutate, self.expect = mutate, expect
        self.base = svc.base_url
        self.session = requests.Session()
        self.failures: list[str] = []
        self.sent = 0

    def send_and_check(self, event: dict[str, Any]) -> None:
        r = self.mutate(event)["request"]
        data = json.dumps(_sub(r["body"], "http://127.0.0.1:PORT", self.base)).encode() if "body" in r else None
        resp = self.session.request(
            r["method"],
            self.dtm.base_url + r["path"],
            params=r["query"],
            data=data,
            headers=r.get("headers") or {},
            timeout=10,
        )
        self.sent += 1
        where = f"{self.name}: {r['method']} {r['path']}"
        got = (resp.status_code, _norm(_sub(resp.json(), self.base, "http://127.0.0.1:PORT")))
        want = (event["response"]["status"], _norm(self.expect(event["response"]["body"])))
        if got != want:
            self.failures.append(f"{where}:\n got  {got}\n want {want}")

    def close(self) -> None:
        self.session.close()


def replay(
    name: str,
    *,
    update_branch_sync: bool,
    mutate: Callable[[dict[str, Any]], dict[str, Any]] = lambda e: e,
    expect: Callable[[Any], Any] = lambda b: b,
) -> None:
    events = load(name)["events"]
    with DtmTestServer(update_branch_sync=update_branch_sync) as dtm, BranchService(default=None) as svc:
        rep = WorkflowReplay(dtm, svc, name, mutate, expect)
        # Split into what the driver sent, and what each resume handler sent before answering DTM.
        segments: list[tuple[Optional[dict[str, Any]], list[dict[str, Any]]]] = [(None, [])]
        for e in events:
            if e["kind"] == "dtm->branch":
                segments.append((e, []))
            elif e["kind"] == "client->dtm":
                segments[-1][1].append(e)
        tail: list[dict[str, Any]] = []
        if len(segments) > 1 and segments[-1][1] and segments[-1][1][-1]["request"]["path"].endswith("/query"):
            tail = [segments[-1][1].pop()]  # the driver's final /query comes after the resume answered
        for resume, inside in segments[1:]:
            assert resume is not None

            def handler(call: Call, inside: list[dict[str, Any]] = inside, resume: Any = resume) -> Answer:
                for e in inside:
                    rep.send_and_check(e)
                body = resume["response"]["body"]
                return Answer(resume["response"]["status"], body if isinstance(body, str) else json.dumps(body))

            svc.route(resume["request"]["path"], handler)
        for e in segments[0][1]:
            rep.send_and_check(e)
        expected = [_callback(e) for e, _ in segments[1:] if e is not None]
        if expected:
            # The first resume call comes exactly next_cron_interval after prepareWorkflow, not before.
            interval = events[0]["response"]["body"]["transaction"]["next_cron_interval"]
            dtm.advance(interval - 0.01)
            assert svc.calls() == [], name
            dtm.advance(0.01)
        for e in tail:
            rep.send_and_check(e)
        dtm.advance(120)  # finished: the cron calls nothing more
        actual = [_recorded(c, rep.base) for c in svc.calls()]
        rep.close()
        assert rep.failures == [], "\n".join(rep.failures)
        assert rep.sent == sum(e["kind"] == "client->dtm" for e in events), name
        assert actual == expected, name


# -- the nine traces ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WF_TRACES)
def test_replay_trace(name: str) -> None:
    """Answers and resume calls as recorded; the *_sync traces on a server with UpdateBranchSync."""
    replay(name, update_branch_sync=name.endswith("_sync"))


@pytest.mark.parametrize("name", SYNC_TRACES)
def test_sync_key_stores_progress_on_a_default_server(name: str) -> None:
    """The same requests plus ``"sync": "1"`` give the UpdateBranchSync answers on a default server."""
    replay(name, update_branch_sync=False, mutate=_with_sync)


@pytest.mark.parametrize("name", SYNC_TRACES)
def test_without_sync_a_default_server_stores_nothing(name: str) -> None:
    """The *_sync traces' requests as the Go client sent them (no ``sync``): no progress anywhere, all else equal."""
    replay(name, update_branch_sync=False, expect=_forget_progress)


# -- helpers for the rule tests -------------------------------------------------------------------


class Recorder:
    """A BranchCaller that records the resume calls and answers from a script (the last answer repeats)."""

    def __init__(self, *answers: BranchAnswer, on_call: Optional[Callable[[], None]] = None) -> None:
        self.answers = list(answers) or [BranchAnswer(200, '{"dtm_result":"SUCCESS"}')]
        self.calls: list[dict[str, Any]] = []
        self.on_call = on_call

    def call(
        self,
        method: str,
        url: str,
        query: Mapping[str, str],
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
    ) -> BranchAnswer:
        self.calls.append(
            {
                "method": method,
                "url": url,
                "query": dict(query),
                "body": body,
                "headers": dict(headers),
                "timeout": timeout,
            }
        )
        if self.on_call is not None:
            self.on_call()
        return self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]

    def close(self) -> None:
        pass


def custom(name: str = "wf", data: Optional[bytes] = INPUT) -> str:
    payload: dict[str, Any] = {"name": name}
    payload["data"] = None if data is None else base64.b64encode(data).decode()
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def wf_body(gid: str, **extra: Any) -> dict[str, Any]:
    """A prepareWorkflow body as the Go client sends it."""
    return {
        "gid": gid,
        "trans_type": "workflow",
        "protocol": "http",
        "concurrent": False,
        "query_prepared": "http://127.0.0.1:9/wf/resume",
        "custom_data": custom(),
        **extra,
    }


def progress(
    gid: str, branch_id: str = "01", op: str = "action", status: str = "succeed", data: str = "x", **extra: str
) -> dict[str, str]:
    return {
        "gid": gid,
        "trans_type": "workflow",
        "branch_id": branch_id,
        "op": op,
        "status": status,
        "data": data,
        **extra,
    }


def finish(gid: str, status: str = "succeed", reason: str = "", result: str = "") -> dict[str, Any]:
    return {
        "gid": gid,
        "trans_type": "workflow",
        "req_extra": {"status": status, "rollback_reason": reason, "result": result},
    }


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def coord(recorder: Recorder) -> Any:
    with DtmTestServer(caller=recorder) as server:
        api = Api(server)
        yield api
        api.session.close()


def times_called(api: Any, recorder: Recorder, seconds: float, step: float = 0.5) -> list[float]:
    """Move the clock ``seconds`` in ``step``s; the offsets (from now) at which resume calls came."""
    start = api.server.clock.now()
    seen: list[float] = []
    moved = 0.0
    while moved < seconds:
        before = len(recorder.calls)
        api.server.advance(step)
        moved += step
        seen.extend([round(api.server.clock.now() - start, 2)] * (len(recorder.calls) - before))
    return seen


# -- the resume cron --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "server", "first"),
    [
        ({}, {}, 10),  # not timeout_to_fail (35 s): DTM's workflow processor never checks it
        ({"timeout_to_fail": 3}, {}, 3),  # below RetryInterval: the interval (the traces)
        ({"timeout_to_fail": 60}, {}, 10),
        ({"retry_interval": 2}, {}, 2),
        ({"retry_interval": 30, "timeout_to_fail": 3}, {}, 30),
        ({}, {"retry_interval": 4}, 4),
        ({}, {"timeout_to_fail": 5}, 10),  # the server's TimeoutToFail plays no part either
    ],
)
def test_first_resume_comes_next_cron_interval_after_prepare(
    options: dict[str, int], server: dict[str, int], first: int
) -> None:
    rec = Recorder()
    with DtmTestServer(caller=rec, **server) as dtm:
        api = Api(dtm)
        resp = api.post("prepareWorkflow", wf_body("G", **options))
        assert resp.json()["transaction"]["next_cron_interval"] == first
        dtm.advance(first - 0.01)
        assert rec.calls == []
        dtm.advance(0.01)
        assert len(rec.calls) == 1
        api.session.close()


@pytest.mark.parametrize(
    "answer",
    [
        BranchAnswer(200, '{"dtm_result":"SUCCESS"}'),  # a handler that did not submit
        BranchAnswer(409, '{"dtm_result":"FAILURE","message":"x"}'),
        BranchAnswer(425, '{"dtm_result":"ONGOING"}'),
        BranchAnswer(500, "unknown workflow"),
        BranchAnswer(0, "ConnectionRefusedError"),  # no answer at all
    ],
    ids=["200", "409", "425", "500", "refused"],
)
def test_resume_answer_changes_nothing_and_repeats_every_retry_interval(answer: BranchAnswer) -> None:
    """DTM ignores what the resume URL answers: no status change, no backoff, no failure by timeout."""
    rec = Recorder(answer)
    with DtmTestServer(caller=rec) as dtm:
        api = Api(dtm)
        api.post("prepareWorkflow", wf_body("G", timeout_to_fail=3))
        assert times_called(api, rec, 64) == [3, 13, 23, 33, 43, 53, 63]
        trans = api.query("G")["transaction"]
        assert trans["status"] == "prepared" and trans["next_cron_interval"] == 3
        assert "rollback_reason" not in trans
        api.session.close()


def test_resume_stops_once_the_resumed_workflow_submits() -> None:
    holder: dict[str, Any] = {}

    def resumed() -> None:  # what a resume handler does: finish the workflow, then answer
        holder["api"].post("submit", finish("G", result=base64.b64encode(b"done").decode()))

    rec = Recorder(on_call=resumed)
    with DtmTestServer(caller=rec) as dtm:
        api = holder["api"] = Api(dtm)
        api.post("prepareWorkflow", wf_body("G"))
        assert times_called(api, rec, 60) == [10]
        trans = api.query("G")["transaction"]
        assert (trans["status"], trans["result"]) == ("succeed", "ZG9uZQ==")
        api.session.close()


def test_resume_request(coord: Any, recorder: Recorder) -> None:
    """POST of the raw input bytes (any bytes), gid/trans_type/branch_id=00/op=<name>, branch headers, timeout."""
    raw = b"\x00\xff binary \xc3"
    coord.post(
        "prepareWorkflow",
        wf_body("G", custom_data=custom("transfer", raw), request_timeout=7, branch_headers={"X-Tenant": "t1"}),
    )
    coord.server.advance(10)
    assert recorder.calls == [
        {
            "method": "POST",
            "url": "http://127.0.0.1:9/wf/resume",
            "query": {"gid": "G", "trans_type": "workflow", "branch_id": "00", "op": "transfer"},
            "body": raw,
            "headers": {"Content-Type": "application/json", "Accept": "application/json", "X-Tenant": "t1"},
            "timeout": 7,
        }
    ]


def test_input_base64_may_hold_line_breaks(coord: Any, recorder: Recorder) -> None:
    """Go's decoder skips CR and LF in base64 (as MIME encoders write it): the input is still the bytes."""
    coord.post("prepareWorkflow", wf_body("G", custom_data=json.dumps({"data": "YWJj\r\nZA==", "name": "wf"})))
    coord.server.advance(10)
    assert [c["body"] for c in recorder.calls] == [b"abcd"]


@pytest.mark.parametrize("data", [b"", None], ids=["empty", "null"])
def test_resume_of_empty_input_is_a_get(coord: Any, recorder: Recorder, data: Optional[bytes]) -> None:
    coord.post("prepareWorkflow", wf_body("G", custom_data=custom("wf", data)))
    coord.server.advance(10)
    [call] = recorder.calls
    assert (call["method"], call["body"], call["timeout"]) == ("GET", None, 3)
    assert call["headers"]["Content-Type"] == "application/json"


def test_resume_over_http_posts_the_input(dtm_server: DtmTestServer, branch_service: BranchService) -> None:
    branch_service.route("/wf/resume", 500)
    api = Api(dtm_server)
    api.post("prepareWorkflow", wf_body("G", query_prepared=branch_service.url("/wf/resume")))
    dtm_server.advance(10)
    [call] = branch_service.calls()
    assert (call.method, call.path, call.body, call.headers["Content-Type"]) == (
        "POST",
        "/wf/resume",
        INPUT.decode(),
        "application/json",
    )
    api.session.close()


def test_empty_query_prepared_is_never_called(coord: Any, recorder: Recorder) -> None:
    assert coord.post("prepareWorkflow", wf_body("G", query_prepared="")).status_code == 200
    coord.server.advance(100)
    assert recorder.calls == [] and coord.query("G")["transaction"]["status"] == "prepared"


def test_force_stop_ends_the_resume_calls(coord: Any, recorder: Recorder) -> None:
    coord.post("prepareWorkflow", wf_body("G"))
    assert coord.post("forceStop", {"gid": "G"}).status_code == 200
    coord.server.advance(100)
    assert recorder.calls == []
    trans = coord.query("G")["transaction"]
    # forceStop writes the stored row (not a submit-built one): custom_data stays.
    assert trans["status"] == "failed" and trans["custom_data"] == custom()


# -- prepareWorkflow, registerBranch and submit rules ---------------------------------------------


def test_prepare_again_answers_the_stored_state(coord: Any) -> None:
    first = coord.post("prepareWorkflow", wf_body("G", timeout_to_fail=3)).json()
    coord.server.advance(1)
    again = coord.post("prepareWorkflow", wf_body("G", timeout_to_fail=50, custom_data=custom("other"))).json()
    assert again == first  # nothing changed by the second prepare
    coord.post("registerBranch", progress("G", data="", sync="1"))
    rows = coord.post("prepareWorkflow", wf_body("G")).json()["progresses"]
    assert rows == [
        {
            "id": 0,
            "create_time": None,
            "update_time": None,
            "gid": "G",
            "branch_id": "01",
            "op": "action",
            "status": "succeed",
        }
    ]  # no bin_data for empty data, no url


def test_prepare_workflow_on_another_type_answers_it(coord: Any) -> None:
    """DTM answers whatever transaction holds the gid."""
    body = {
        "gid": "G",
        "trans_type": "msg",
        "steps": [{"action": "http://127.0.0.1:9/a"}],
        "payloads": ["{}"],
        "query_prepared": "http://127.0.0.1:9/q",
    }
    assert coord.post("prepare", body).status_code == 200
    resp = coord.post("prepareWorkflow", wf_body("G"))
    assert resp.status_code == 200
    assert resp.json()["transaction"]["trans_type"] == "msg"
    assert [(p["branch_id"], p["op"]) for p in resp.json()["progresses"]] == [("01", "action")]


def test_finished_workflow_answers_result_and_reason(coord: Any) -> None:
    coord.post("prepareWorkflow", wf_body("G1"))
    coord.post("prepareWorkflow", wf_body("G2"))
    assert coord.post("submit", finish("G1", result="cmVz")).json() == {"dtm_result": "SUCCESS"}
    assert coord.post("submit", finish("G2", "failed", reason="out of stock FAILURE")).status_code == 200
    t1 = coord.post("prepareWorkflow", wf_body("G1")).json()["transaction"]
    t2 = coord.post("prepareWorkflow", wf_body("G2")).json()["transaction"]
    assert (t1["status"], t1["result"], t1["create_time"], "custom_data" in t1) == ("succeed", "cmVz", None, False)
    assert (t2["status"], t2["rollback_reason"], "rollback_time" in t2) == ("failed", "out of stock FAILURE", True)
    all_rows = coord.get("all").json()["transactions"]
    assert sorted(t["gid"] for t in all_rows) == ["G1", "G2"]


def test_progress_needs_a_prepared_workflow(coord: Any) -> None:
    resp = coord.post("registerBranch", progress("NOSUCH", sync="1"))
    assert (resp.status_code, resp.json()) == (
        409,
        {"dtm_result": "FAILURE", "message": "no trans with gid: NOSUCH status: prepared found FAILURE"},
    )
    # Without sync DTM only queues the update: 200, whatever the gid.
    assert coord.post("registerBranch", progress("NOSUCH")).json() == {"dtm_result": "SUCCESS"}
    coord.post("prepareWorkflow", wf_body("G"))
    coord.post("submit", finish("G"))
    resp = coord.post("registerBranch", progress("G", sync="1"))
    assert resp.status_code == 409
    assert coord.query("G")["branches"] == []


def test_duplicate_progress(coord: Any) -> None:
    coord.post("prepareWorkflow", wf_body("G"))
    assert coord.post("registerBranch", progress("G", sync="1")).status_code == 200
    resp = coord.post("registerBranch", progress("G", sync="1", data="other"))
    assert (resp.status_code, resp.json()) == (500, {"message": "storage: UniqueKeyConflict"})
    assert coord.post("registerBranch", progress("G", op="rollback", data="", sync="1")).status_code == 200
    assert coord.post("registerBranch", progress("G", branch_id="02", sync="1")).status_code == 200
    rows = [(b["branch_id"], b["op"], b.get("bin_data")) for b in coord.query("G")["branches"]]
    assert rows == [("01", "action", "eA=="), ("01", "rollback", None), ("02", "action", "eA==")]


def test_concurrent_registration_of_one_branch(coord: Any) -> None:
    """Eight resumed processes record the same step at once: one row, one success, seven unique-key errors."""
    coord.post("prepareWorkflow", wf_body("G"))
    n = 8
    gate = threading.Barrier(n)
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def register(i: int) -> None:
        with requests.Session() as session:
            gate.wait()
            resp = session.post(
                f"{coord.server.url}/registerBranch",
                timeout=10,
                data=json.dumps(progress("G", data=f"run{i}", sync="1")),
            )
            with lock:
                results.append((resp.status_code, resp.json()))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _ in results) == [200] + [500] * (n - 1)
    assert all(body == {"message": "storage: UniqueKeyConflict"} for s, body in results if s == 500)
    [row] = coord.query("G")["branches"]
    assert row["branch_id"] == "01" and base64.b64decode(row["bin_data"]).decode().startswith("run")


def test_submit_rules(coord: Any) -> None:
    resp = coord.post("submit", finish("NOSUCH"))
    assert (resp.status_code, resp.json()) == (500, {"message": "storage: NotFound"})
    coord.post("prepareWorkflow", wf_body("G"))
    for status in ("", "prepared", "submitted", "done"):
        resp = coord.post("submit", finish("G", status))
        assert resp.status_code == 500 and "must be succeed or failed" in resp.json()["message"]
    assert coord.query("G")["transaction"]["status"] == "prepared"
    assert coord.post("submit", finish("G", "failed", reason="r")).status_code == 200
    resp = coord.post("submit", finish("G"))  # compare-and-set from prepared fails
    assert (resp.status_code, resp.json()) == (500, {"message": "storage: NotFound"})
    trans = coord.query("G")["transaction"]
    assert (trans["status"], trans["rollback_reason"]) == ("failed", "r")
    coord.post("prepare", {"gid": "T", "trans_type": "tcc"})
    resp = coord.post("submit", finish("T"))
    assert resp.status_code == 500 and "not a workflow" in resp.json()["message"]
    assert coord.query("T")["transaction"]["status"] == "prepared"


def test_submit_body_options_show_in_query(coord: Any) -> None:
    """boltdb keeps the submit-built object: its options, none of the prepare body's."""
    coord.post("prepareWorkflow", wf_body("G", timeout_to_fail=3))
    coord.post("submit", {**finish("G"), "retry_interval": 7})
    trans = coord.query("G")["transaction"]
    assert trans == {
        "id": 0,
        "create_time": None,
        "update_time": trans["update_time"],
        "gid": "G",
        "trans_type": "workflow",
        "status": "succeed",
        "protocol": "http",
        "finish_time": trans["finish_time"],
        "retry_interval": 7,
        "concurrent": False,
    }


def test_other_endpoints_refuse_or_ignore_workflows(coord: Any) -> None:
    resp = coord.post("prepare", wf_body("G"))
    assert resp.status_code == 500 and "prepareWorkflow" in resp.json()["message"]
    coord.post("prepareWorkflow", wf_body("G"))
    resp = coord.post("abort", {"gid": "G", "trans_type": "workflow"})
    assert (resp.status_code, resp.json()) == (
        409,
        {"dtm_result": "FAILURE", "message": "trans type: 'workflow' current status 'prepared', cannot abort. FAILURE"},
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"custom_data": {"name": "wf"}},
            "json: cannot unmarshal object into Go struct field TransGlobal.custom_data of type string",
        ),
        (
            {"timeout_to_fail": "3"},
            "json: cannot unmarshal string into Go struct field TransGlobal.timeout_to_fail of type int64",
        ),
        ({"gid": ""}, "gid cannot be empty"),
        ({"trans_type": "saga"}, "prepareWorkflow needs trans_type 'workflow', not 'saga'"),
        ({"trans_type": ""}, "prepareWorkflow needs trans_type 'workflow', not ''"),
        ({"protocol": "grpc"}, "protocol 'grpc' is not supported by the dtmcli test coordinator (http only)"),
        ({"query_prepared": "localhost:8080/wf"}, "bad url for http: localhost:8080/wf"),
        ({"custom_data": ""}, "workflow custom_data is empty: unexpected end of JSON input"),
        ({"custom_data": "{"}, "unexpected end of JSON input"),
        ({"custom_data": "[1]"}, "json: cannot unmarshal array into Go value of type dtmsvr.cWorkflowCustom"),
        (
            {"custom_data": '{"name":1}'},
            "json: cannot unmarshal number into Go struct field cWorkflowCustom.name of type string",
        ),
        (
            {"custom_data": '{"name":"wf","data":[1]}'},
            "json: cannot unmarshal array into Go struct field cWorkflowCustom.data of type []uint8",
        ),
        ({"custom_data": '{"name":"wf","data":"ab!d"}'}, "illegal base64 data at input byte 2"),
        ({"custom_data": '{"name":"wf","data":"abc"}'}, "illegal base64 data at input byte 0"),
        ({"custom_data": '{"name":"wf","data":"abcdabc"}'}, "illegal base64 data at input byte 4"),
        ({"custom_data": '{"name":"wf","data":"ab=dabcd"}'}, "illegal base64 data at input byte 2"),
    ],
)
def test_prepare_workflow_errors(coord: Any, recorder: Recorder, body: dict[str, Any], message: str) -> None:
    resp = coord.post("prepareWorkflow", {**wf_body("G"), **body})
    assert (resp.status_code, resp.json()) == (500, {"message": message})
    assert coord.query("G") == {"transaction": None, "branches": []}
    coord.server.advance(100)
    assert recorder.calls == []


def test_prepare_workflow_bad_json(coord: Any) -> None:
    resp = coord.post("prepareWorkflow", raw=b'{"gid": "G", nope')
    assert (resp.status_code, resp.json()) == (
        500,
        {"message": "invalid character 'n' looking for beginning of object key string"},
    )
    resp = coord.post("prepareWorkflow", raw=b"[]")
    assert resp.json() == {"message": "json: cannot unmarshal array into Go value of type dtmsvr.TransGlobal"}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"data": 1}, 400, "json: cannot unmarshal number into Go struct field .data of type string"),
        ({"status": "done"}, 500, "a workflow branch status must be succeed or failed, not 'done'"),
        ({"status": ""}, 500, "a workflow branch status must be succeed or failed, not ''"),
        ({"op": ""}, 500, "a workflow branch needs branch_id and op"),
        ({"branch_id": ""}, 500, "a workflow branch needs branch_id and op"),
    ],
)
def test_register_errors(coord: Any, body: dict[str, Any], status: int, message: str) -> None:
    coord.post("prepareWorkflow", wf_body("G"))
    resp = coord.post("registerBranch", {**progress("G", sync="1"), **body})
    assert (resp.status_code, resp.json()) == (status, {"message": message})
    assert coord.query("G")["branches"] == []


# -- SQL column limits (the double refuses what DTM's SQL stores refuse) ----------------------------


def _too_long(column: str) -> dict[str, Any]:
    return {"message": f"Error 1406 (22001): Data too long for column '{column}' at row 1"}


def test_custom_data_limit(coord: Any) -> None:
    """1,024 characters of custom_data are stored; one more is refused before anything is stored."""
    fits = custom("w" * (1024 - len(custom("", b""))), b"")
    assert len(fits) == 1024
    resp = coord.post("prepareWorkflow", wf_body("G1", custom_data=fits))
    assert resp.status_code == 200 and resp.json()["transaction"]["custom_data"] == fits
    too_long = custom("w" * (1025 - len(custom("", b""))), b"")
    resp = coord.post("prepareWorkflow", wf_body("G2", custom_data=too_long))
    assert (resp.status_code, resp.json()) == (500, _too_long("custom_data"))
    assert coord.query("G2")["transaction"] is None
    # Characters, not bytes (MySQL utf8mb4): 1,024 non-ASCII characters fit.
    wide = custom("é" * (1024 - len(custom("", b""))), b"")
    assert coord.post("prepareWorkflow", wf_body("G3", custom_data=wide)).status_code == 200


def test_other_column_limits(coord: Any) -> None:
    url = "http://127.0.0.1:9/" + "p" * (1024 - len("http://127.0.0.1:9/"))
    assert coord.post("prepareWorkflow", wf_body("G", query_prepared=url)).status_code == 200
    assert coord.post("prepareWorkflow", wf_body("G1", query_prepared=url + "p")).json() == _too_long("query_prepared")
    assert coord.post("prepareWorkflow", wf_body("g" * 129)).json() == _too_long("gid")
    assert coord.post("prepareWorkflow", wf_body("g" * 128)).status_code == 200
    for column, extra in (
        ("result", finish("G", result="r" * 1025)),
        ("rollback_reason", finish("G", "failed", reason="r" * 1025)),
    ):
        resp = coord.post("submit", extra)
        assert (resp.status_code, resp.json()) == (500, _too_long(column))
        assert coord.query("G")["transaction"]["status"] == "prepared"
    assert coord.post("submit", finish("G", "failed", reason="r" * 1024)).status_code == 200


def test_progress_data_limit(coord: Any) -> None:
    """A progress row's data is MySQL's ``bin_data`` BLOB: 65,535 bytes (not characters) are kept."""
    coord.post("prepareWorkflow", wf_body("G"))
    fits = progress("G", sync="1", data="d" * 65535)
    assert coord.post("registerBranch", fits).status_code == 200
    wide = progress("G", branch_id="02", sync="1", data="é" * 32768)  # 65,536 bytes in 32,768 characters
    resp = coord.post("registerBranch", wide)
    assert (resp.status_code, resp.json()) == (500, _too_long("bin_data"))
    assert [b["branch_id"] for b in coord.query("G")["branches"]] == ["01"]


# -- persistence ----------------------------------------------------------------------------------


def test_progress_and_final_state_survive_a_restart(tmp_path: Any) -> None:
    path = str(tmp_path / "dtm.sqlite")
    rec = Recorder(BranchAnswer(500, ""))
    with DtmTestServer(sqlite_path=path, caller=rec) as dtm:
        api = Api(dtm)
        api.post("prepareWorkflow", wf_body("G"))
        api.post("prepareWorkflow", wf_body("F"))
        api.post("registerBranch", progress("G", sync="1"))
        api.post("submit", finish("F", result="cmVz"))
        before = {gid: api.query(gid) for gid in ("G", "F")}
        api.session.close()
    with DtmTestServer(sqlite_path=path, caller=rec) as dtm:
        api = Api(dtm)
        assert {gid: api.query(gid) for gid in ("G", "F")} == before
        assert api.query("F")["transaction"]["create_time"] is None
        dtm.advance(10)
        assert [c["query"]["gid"] for c in rec.calls] == ["G"]  # the prepared one is still resumed
        api.session.close()


def test_real_clock_cron_resumes(branch_service: BranchService) -> None:
    """With the real clock (``python -m dtmcli.testing``) the cron thread makes the resume call by itself."""
    branch_service.route("/wf/resume", 500)
    with DtmTestServer(clock="real", cron_interval=0.05) as dtm:
        api = Api(dtm)
        api.post("prepareWorkflow", wf_body("G", retry_interval=1, query_prepared=branch_service.url("/wf/resume")))
        start = time.monotonic()
        [call] = branch_service.wait_calls(1, timeout=5)
        assert 0.9 <= time.monotonic() - start < 4
        assert (call.method, call.query["op"], call.body) == ("POST", "wf", INPUT.decode())
        assert api.query("G")["transaction"]["status"] == "prepared"
        api.session.close()
