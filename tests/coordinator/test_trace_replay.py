"""Replay the recorded DTM v1.19.0 exchanges against the in-process coordinator.

For every plain-HTTP trace (not goclient_*/workflow_*/grpc_*), the client requests are sent again, a
BranchService answers each callback as the trace's branch did, and we check the same callbacks
(method, path, query, body, headers), the same answers to the client, and the same stored states.
Time is moved only when the trace shows callbacks that the cron made (the real cron polls with
jitter, ours runs exactly when due), so the comparison does not depend on timing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Optional

import pytest
import requests
from traces import TRACES, load

from dtmcli.testing import Answer, BranchService, DtmTestServer

NAMES = sorted(
    p.stem for p in TRACES.glob("*.json") if not p.stem.startswith(("goclient_", "workflow_", "grpc_"))
)
# An empty parameter set would silently skip every replay: fail loudly instead.
if len(NAMES) < 40:
    raise RuntimeError(f"expected at least 40 plain-HTTP traces in {TRACES}, found {len(NAMES)}")
# DTM's non-idempotent resubmit is deliberately not replicated; see test_coordinator_api.py.
DEVIATIONS = {"saga_resubmit_submitted", "tcc_submit_wait_result_425"}
# Branches run in parallel: compare the callbacks as a multiset (ordering is tested separately).
CONCURRENT = {"msg_concurrent", "saga_concurrent_orders", "saga_concurrent_orders_fail"}
# The real cron happened to skip a due retry (it polls with jitter); ours retries exactly when due.
COLLAPSE_REPEATS = {"saga_timeout_to_fail"}
# Bodies that depend on the server instance rather than on the rules.
DYNAMIC_BODIES = ("/query", "/all", "/newGid", "/version", "/resetCronTime")
_SKIP_HEADERS = {"host", "user-agent", "content-length", "accept-encoding", "connection"}

PORT = "http://127.0.0.1:PORT"


def _sub(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_sub(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _sub(v, old, new) for k, v in value.items()}
    return value


def _answer(response: dict[str, Any]) -> Answer:
    body = response["body"]
    return Answer(response["status"], body if isinstance(body, str) else json.dumps(body))


def _callback(kind_event: dict[str, Any]) -> tuple[Any, ...]:
    r = kind_event["request"]
    pairs = (r.get("headers") or {}).items()
    headers = tuple(sorted((k.lower(), v) for k, v in pairs if k.lower() not in _SKIP_HEADERS))
    return r["method"], r["path"], tuple(sorted(r["query"].items())), r["body"], headers


def _recorded(call: Any, base: str) -> tuple[Any, ...]:
    headers = tuple(
        sorted((k.lower(), v) for k, v in call.headers.items() if k.lower() not in _SKIP_HEADERS)
    )
    return call.method, call.path, tuple(sorted(call.query.items())), _sub(call.body, base, PORT), headers


def _collapse(seq: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [c for i, c in enumerate(seq) if i == 0 or c != seq[i - 1]]


def _state(body: Any) -> Optional[tuple[Any, ...]]:
    """The rule-relevant part of a /query answer."""
    trans = body.get("transaction")
    if trans is None:
        return None
    branches = tuple(
        (b["branch_id"], b["op"], b["status"], b["url"], b.get("bin_data")) for b in body.get("branches") or []
    )
    return trans["status"], trans.get("rollback_reason"), trans["trans_type"], branches


class Replayer:
    def __init__(self, dtm: DtmTestServer, svc: BranchService, events: list[dict[str, Any]]) -> None:
        self.dtm, self.svc, self.events = dtm, svc, events
        self.session = requests.Session()
        self.base = svc.base_url

    def dtm_callbacks(self) -> list[Any]:
        return [c for c in self.svc.calls() if "dtm" not in c.query]

    def catch_up(self, expected: int) -> None:
        """Advance the clock until the coordinator has made ``expected`` callbacks (at most 120 s)."""
        self.dtm.wait_idle()
        for _ in range(240):
            if len(self.dtm_callbacks()) >= expected:
                return
            self.dtm.advance(0.5)

    def send(self, event: dict[str, Any]) -> requests.Response:
        r = event["request"]
        url = r["path"]
        if event["kind"] == "client->dtm":
            url = self.dtm.base_url + url
        else:
            url = self.base + url
        headers = dict(r.get("headers") or {})
        params = {k: (v.replace(PORT, self.base) if isinstance(v, str) else v) for k, v in r["query"].items()}
        if "body_raw" in r:
            data: Optional[bytes] = r["body_raw"].encode()
        elif event["kind"] == "client->dtm":
            data = json.dumps(_sub(r["body"], PORT, self.base)).encode() if r.get("body") is not None else None
            if data is not None:
                headers.setdefault("Content-Type", "application/json")
        else:
            data = r["body"].encode() if r.get("body") else None
        return self.session.request(r["method"], url, params=params, data=data, headers=headers, timeout=10)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in DEVIATIONS])
def test_replay(name: str) -> None:
    trace = load(name)
    events = trace["events"]
    with DtmTestServer() as dtm, BranchService() as svc:
        scripts: dict[str, list[Answer]] = defaultdict(list)
        for e in events:
            if e["kind"] != "client->dtm":
                scripts[e["request"]["path"]].append(_answer(e["response"]))
        for path, answers in scripts.items():
            svc.route(path, *answers)
        rep = Replayer(dtm, svc, events)
        seen_callbacks = 0
        for e in events:
            if e["kind"] == "dtm->branch":
                seen_callbacks += 1
                continue
            rep.catch_up(seen_callbacks)
            resp = rep.send(e)
            path = e["request"]["path"]
            where = f"{name}: {e['request']['method']} {path}"
            assert resp.status_code == e["response"]["status"], f"{where}: {resp.text}"
            if e["kind"] != "client->dtm":
                continue
            got = _sub(resp.json(), rep.base, PORT)
            if path.endswith("/query") and isinstance(got, dict) and "transaction" in got:
                rep.catch_up(seen_callbacks)
                got = _sub(requests.get(dtm.url + "/query", params=e["request"]["query"], timeout=5).json(),
                           rep.base, PORT)
                assert _state(got) == _state(e["response"]["body"]), where
            elif not path.endswith(DYNAMIC_BODIES):
                assert got == e["response"]["body"], where
        rep.catch_up(seen_callbacks)
        expected = [_callback(e) for e in events if e["kind"] == "dtm->branch"]
        actual = [_recorded(c, rep.base) for c in rep.dtm_callbacks()]
        if name in COLLAPSE_REPEATS:
            expected, actual = _collapse(expected), _collapse(actual)
        if name in CONCURRENT:
            expected, actual = sorted(expected), sorted(actual)
        assert actual == expected
        rep.session.close()
