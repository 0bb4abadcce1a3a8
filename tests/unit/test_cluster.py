"""DTM clusters: ``DtmClient([url_a, url_b])`` sends each call to a server that is up, and fails over
only within the safety rules (a refused call moves at once; after a timeout only idempotent calls move;
a submit is never sent twice)."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import pytest

from dtmcli import DEFAULT_DTM, DtmClient, DtmConnectError, DtmTimeout, Saga, Tcc, local_gid
from dtmcli._flow import Request, Sleep
from dtmcli._protocol import Response
from dtmcli._retry import ExponentialBackoff, Retry
from dtmcli.client import ServerPool, as_client, server_urls
from dtmcli.errors import DtmConnectTimeout, DtmInvalidInput, DtmTransportError
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
        self.requests: list[Request] = []

    def drive(self, flow: Any) -> Any:
        return self.drive_from(flow, None)

    def drive_from(self, flow: Any, value: Any) -> Any:
        """Drive ``flow``, starting by sending (or throwing) ``value`` in."""
        failed = isinstance(value, BaseException)
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
            self.requests.append(effect)
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


def test_the_default_address_means_the_environment_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTMCLI_SERVER", f" {A} ,{B},\t")  # as the trust list and the CLI accept it
    try:
        assert DtmClient().urls == (A, B)
        assert Saga().client.urls == (A, B) and Saga().dtm == A
        assert as_client(DEFAULT_DTM).urls == (A, B)
        explicit = "http://localhost:36789/api/dtmsvr"[:]  # the same text typed by the user: not the default
        assert Saga("".join(explicit)).client.urls == (explicit,)
    finally:
        DtmClient.close_shared()


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
    assert c.url == B  # not resent, but later calls prefer the other server


def test_an_idempotent_call_after_a_timeout_retries_on_the_next_server() -> None:
    """Also without any retry left: the servers not tried yet are not retries."""
    c = cluster()
    script = Script(DtmTimeout("slow"), EMPTY_QUERY)
    assert script.drive(c._query_flow("G")) is None
    assert script.urls == [f"{A}/query", f"{B}/query"] and script.sleeps == []  # an untried server: at once


def test_an_idempotent_call_leaves_time_for_the_servers_not_tried_yet() -> None:
    c = cluster(timeout=10)
    script = Script(EMPTY_QUERY)
    flow = c._query_flow("G")
    first = next(flow)
    assert isinstance(first, Request) and first.timeout is not None and 4.5 < first.timeout <= 5.0
    assert script.drive_from(flow, DtmTimeout("slow")) is None
    (second,) = script.requests
    assert isinstance(second, Request) and second.url == f"{B}/query" and second.timeout is not None
    assert second.timeout > 8.0  # the last server gets all that is left
    submit = next(cluster(timeout=10)._post_flow("submit", {"gid": "G"}))
    assert isinstance(submit, Request) and submit.timeout is not None and submit.timeout > 9.5  # never cut short


def test_a_refusal_that_used_up_the_budget_still_says_nothing_was_sent() -> None:
    c = cluster(timeout=0.2, retry=Retry(retries=0))
    flow = c._post_flow("submit", {"gid": "G"})
    next(flow)
    time.sleep(0.25)  # the refusal took the whole budget (slow DNS, no route)
    with pytest.raises(DtmConnectTimeout) as e:
        flow.throw(DtmConnectError("no route"))
    assert isinstance(e.value, DtmTimeout) and "ran out" in e.value.message


def test_the_pool_is_safe_under_threads() -> None:
    import threading

    pool = ServerPool((A, B, "http://c"), down_for=0.0001)
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for i in range(20000):
                now = i * 0.00001
                pool.mark_down((A, B)[i % 2], now)
                pool.order(now)
                pool.mark_up((A, B)[(i + 1) % 2])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_cluster_keeps_working_when_a_server_dies_mid_transaction(tmp_path: Any) -> None:
    """Two coordinators on one store (SQLite): A serves, dies in the middle of a TCC, B takes over."""
    store = str(tmp_path / "dtm.sqlite")
    port_b = free_port()
    with BranchService() as busi, DtmTestServer(clock="real", sqlite_path=store) as a:
        url_b = f"http://127.0.0.1:{port_b}/api/dtmsvr"
        client = DtmClient([a.url, url_b], timeout=5)
        gids = []
        try:
            for i in range(3):  # B is not even up: A serves
                gid = local_gid()
                Saga(client, gid, wait_result=True).add(busi.route("/out"), busi.route("/com"), {"n": i}).submit()
                gids.append(gid)
            tcc = Tcc(client, local_gid())
            tcc.prepare()
            tcc.call_branch({"n": 1}, busi.route("/try"), busi.route("/confirm"), busi.route("/cancel"))
            a.close()  # A dies with the TCC prepared and one branch registered
            with DtmTestServer(clock="real", sqlite_path=store, port=port_b) as b:
                tcc.call_branch({"n": 2}, busi.route("/try"), busi.route("/confirm"), busi.route("/cancel"))
                tcc.submit()  # registerBranch and submit went to B, which shares A's store
                assert client.url == url_b
                for i in range(3):
                    gid = local_gid()
                    Saga(client, gid, wait_result=True).add(busi.route("/out"), busi.route("/com"), {"n": i}).submit()
                    gids.append(gid)
                assert b.wait_final(tcc.gid).status == "succeed"
                assert all(b.query(g).status == "succeed" for g in gids)  # type: ignore[union-attr]
        finally:
            client.close()
    assert sorted(c.branch_id for c in busi.calls("/confirm")) == ["01", "02"] and not busi.calls("/cancel")
    assert len(busi.calls("/out")) == 6 and not busi.calls("/com")  # each saga ran once


def test_the_async_client_fails_over_by_the_same_rules() -> None:
    import asyncio

    from dtmcli.asyncio import AsyncDtmClient
    from dtmcli.asyncio import Saga as AsyncSaga

    dead = f"http://127.0.0.1:{free_port()}/api/dtmsvr"
    with BranchService() as busi, DtmTestServer() as live:

        async def main() -> None:
            async with AsyncDtmClient([dead, live.url], timeout=5) as client:
                await AsyncSaga(client, "G-async").add(busi.route("/out"), "", {}).submit()
                assert client.url == live.url and client.servers.down(time.monotonic()) == (dead,)

        asyncio.run(main())
        assert live.query("G-async") is not None


def test_an_idempotent_call_reaches_the_next_server_even_with_no_retries() -> None:
    c = cluster(retry=Retry(retries=0))
    script = Script(DtmTimeout("slow"), EMPTY_QUERY)
    assert script.drive(c._query_flow("G")) is None
    assert script.urls == [f"{A}/query", f"{B}/query"]


def test_recover_resends_after_a_connect_timeout_also_with_wait_result() -> None:
    saga = Saga(cluster(retry=Retry(retries=0)), "G", wait_result=True).add("http://b/x", "", {})
    script = Script(DtmConnectTimeout("a"), DtmConnectTimeout("b"), EMPTY_QUERY, OK)
    script.drive(saga._run_flow("submit", lambda: saga._submit_flow(True)))
    assert [u.rsplit("/", 1)[1] for u in script.urls] == ["submit", "submit", "query", "submit"]
