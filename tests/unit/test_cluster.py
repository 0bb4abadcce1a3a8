"""DTM clusters: ``DtmClient([url_a, url_b])`` sends each call to a server that is up, and fails over
only within the safety rules (a refused call moves at once; after a timeout only idempotent calls move;
a submit is never sent twice)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from dtmcli import DtmClient, DtmConnectError, DtmTimeout, Saga, local_gid
from dtmcli._flow import Request, Sleep
from dtmcli._protocol import Response
from dtmcli._retry import ExponentialBackoff, Retry
from dtmcli.client import ServerPool, as_client, server_urls
from dtmcli.errors import DtmInvalidInput, DtmTransportError
from dtmcli.testing import BranchService, DtmTestServer

A = "http://dtm-a.invalid:36789/api/dtmsvr"
B = "http://dtm-b.invalid:36789/api/dtmsvr"
OK = Response(200, b'{"dtm_result":"SUCCESS"}')
EMPTY_QUERY = Response(200, b'{"transaction":null}')


class Script:
    """Answers each effect of a flow from a list; records the URLs requested."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []
        self.sleeps: list[float] = []

    def drive(self, flow: Any) -> Any:
        value: Any = None
        failed = False
        while True:
            try:
                effect = flow.throw(value) if failed else flow.send(value)
            except StopIteration as stop:
                return stop.value
            if isinstance(effect, Sleep):
                self.sleeps.append(effect.seconds)
                value, failed = None, False
                continue
            assert isinstance(effect, Request)
            self.urls.append(effect.url)
            answer = self.answers.pop(0)
            value, failed = answer, isinstance(answer, BaseException)


def cluster(**kwargs: Any) -> DtmClient:
    kwargs.setdefault("retry", Retry(retries=2, backoff=ExponentialBackoff(0.01, 0.01)))
    return DtmClient([A, B], **kwargs)


# -- configuration -----------------------------------------------------------------------------------


def test_urls_from_a_list_a_comma_string_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert server_urls([A, B + "/"]) == (A, B)
    assert server_urls(f"{A}, {B},{A}") == (A, B)
    monkeypatch.setenv("DTMCLI_SERVER", f"{B},{A}")
    assert DtmClient().urls == (B, A)
    monkeypatch.delenv("DTMCLI_SERVER")
    assert DtmClient().urls == ("http://localhost:36789/api/dtmsvr",)
    for bad in ([], [A, "ftp://x"], [A, 3], "http://a/,"):
        with pytest.raises(DtmInvalidInput):
            server_urls(bad)  # type: ignore[arg-type]
    with pytest.raises(DtmInvalidInput):
        DtmClient([A, B], down_for=-1)


def test_one_shared_client_per_cluster_and_the_builders_take_a_list() -> None:
    try:
        assert as_client([A, B]) is as_client(f"{A},{B}") is DtmClient.for_url((A, B))
        saga = Saga([A, B], "G").add(f"{A}/x", "", {})
        assert saga.client.urls == (A, B) and saga.dtm == A
        assert repr(saga.client) == f"DtmClient({[A, B]!r})"
    finally:
        DtmClient.close_shared([A, B])


def test_the_pool_orders_servers_up_first_and_brings_them_back(caplog: pytest.LogCaptureFixture) -> None:
    pool = ServerPool((A, B, "http://c"), down_for=5)
    assert pool.order(0) == (A, B, "http://c")
    with caplog.at_level(logging.WARNING, "dtmcli"):
        pool.mark_down(A, 10)
        pool.mark_down(A, 11)  # already down: one warning
        pool.mark_down(B, 12)
    assert len(caplog.records) == 2
    assert pool.order(13) == ("http://c", A, B)  # the down ones last, soonest back first
    assert pool.down(13) == (A, B)
    assert pool.order(16.5) == (A, "http://c", B)
    pool.mark_up(B)
    assert pool.order(13) == (B, "http://c", A)


# -- failover rules, on the flows ------------------------------------------------------------------


def test_a_refused_submit_moves_to_the_next_server_at_once() -> None:
    c = cluster()
    script = Script(DtmConnectError("refused"), OK)
    script.drive(c._post_flow("submit", {"gid": "G"}))
    assert script.urls == [f"{A}/submit", f"{B}/submit"] and script.sleeps == []
    assert c.url == B  # A is set aside for a while
    script = Script(OK)
    script.drive(c._post_flow("submit", {"gid": "G2"}))
    assert script.urls == [f"{B}/submit"]


@pytest.mark.parametrize("error", [DtmTimeout("lost"), DtmTransportError("reset")])
def test_a_submit_that_may_have_arrived_is_never_sent_to_another_server(error: Exception) -> None:
    c = cluster()
    script = Script(error)
    with pytest.raises(type(error)):
        script.drive(c._post_flow("submit", {"gid": "G"}))
    assert script.urls == [f"{A}/submit"]
    assert c.url == A  # a timeout does not mark the server down


def test_an_idempotent_call_after_a_timeout_retries_on_the_next_server() -> None:
    c = cluster()
    script = Script(DtmTimeout("slow"), EMPTY_QUERY)
    assert script.drive(c._query_flow("G")) is None
    assert script.urls == [f"{A}/query", f"{B}/query"] and len(script.sleeps) == 1


def test_when_every_server_refuses_the_call_fails_as_refused() -> None:
    c = cluster(retry=Retry(retries=0))
    script = Script(DtmConnectError("a"), DtmConnectError("b"))
    with pytest.raises(DtmConnectError):
        script.drive(c._post_flow("submit", {"gid": "G"}))
    assert script.urls == [f"{A}/submit", f"{B}/submit"]


def test_recover_resubmits_on_another_server_only_when_nothing_was_sent() -> None:
    c = cluster(retry=Retry(retries=0))
    saga = Saga(c, "G").add("http://b/x", "", {})
    # Both refuse the submit; the query goes to the first server back; nothing known -> submit again.
    script = Script(DtmConnectError("a"), DtmConnectError("b"), EMPTY_QUERY, OK)
    script.drive(saga._run_flow("submit", lambda: saga._submit_flow(True)))
    assert [u.rsplit("/", 1)[1] for u in script.urls] == ["submit", "submit", "query", "submit"]
    assert saga.state == "submitted"


# -- end to end: two coordinators, one stopped mid-run --------------------------------------------


def test_sagas_keep_succeeding_when_one_coordinator_stops() -> None:
    with BranchService() as busi, DtmTestServer(clock="real") as a, DtmTestServer(clock="real") as b:
        client = DtmClient([a.url, b.url], timeout=5)
        gids: list[str] = []
        try:
            for i in range(12):
                if i == 5:
                    a.close()  # the first coordinator goes away mid-run
                gid = local_gid()
                Saga(client, gid, wait_result=True).add(busi.route("/out"), busi.route("/com"), {"n": i}).submit()
                gids.append(gid)
        finally:
            client.close()
        on_a = [g for g in gids if a.engine.store.get(g) is not None]
        on_b = [g for g in gids if b.engine.store.get(g) is not None]
        assert len(on_a) == 5 and len(on_b) == 7 and not set(on_a) & set(on_b)  # each submitted exactly once
        assert all(b.query(g).status == "succeed" for g in on_b)  # type: ignore[union-attr]
        assert len(busi.calls("/out")) == 12 and not busi.calls("/com")
