"""The trusted DTM servers: a forged ``dtm`` in a branch call's query is refused (400), not called (SSRF)."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import flask
import pytest
import requests
from web_servers import serve_wsgi

from dtmcli import (
    BranchInfo,
    BranchRequestError,
    DtmInvalidInput,
    Tcc,
    _dtm_servers,
    local_gid,
    register_xa_branch,
    set_dtm_servers,
)
from dtmcli.contrib.flask import branch_handler
from dtmcli.testing import BranchService

DTM = "http://dtm.internal:36789/api/dtmsvr"
TRY = {"gid": "G-ssrf", "trans_type": "tcc", "branch_id": "01", "op": "try"}
XA_ACTION = {"gid": "G-ssrf", "trans_type": "xa", "branch_id": "01", "op": "action", "phase2_url": "http://busi/xa"}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("DTMCLI_SERVER", raising=False)
    monkeypatch.setattr(_dtm_servers, "_warned", False)
    set_dtm_servers()
    yield
    set_dtm_servers()


@pytest.fixture
def evil() -> Iterator[BranchService]:
    """A host the attacker wants the service to call."""
    with BranchService() as svc:
        yield svc


def info(query: dict[str, str], dtm: str) -> BranchInfo:
    return BranchInfo.from_query({**query, "dtm": dtm})


@pytest.mark.parametrize(
    "same", [DTM, "HTTP://DTM.internal:36789/api/dtmsvr/", "http://dtm.internal:36789/api/dtmsvr//"]
)
def test_configured_server_is_accepted_in_canonical_form(same: str) -> None:
    set_dtm_servers(DTM)
    assert info(TRY, same).require_dtm() == same


@pytest.mark.parametrize(
    "other",
    [
        "http://127.0.0.1:6379/",
        "http://dtm.internal:36790/api/dtmsvr",
        "https://dtm.internal:36789/api/dtmsvr",
        "http://dtm.internal:36789/api/other",
        "http://admin@dtm.internal:36789/api/dtmsvr",
        "http://dtm.internal:36789/api/dtmsvr?x=1",
    ],
)
def test_other_servers_are_400(other: str) -> None:
    set_dtm_servers(DTM, "http://dtm2.internal:36789/api/dtmsvr")
    with pytest.raises(BranchRequestError, match="not a trusted DTM server"):
        info(TRY, other).require_dtm()


def test_default_ports_are_equivalent() -> None:
    set_dtm_servers("http://dtm.internal/api/dtmsvr", "https://dtm.internal/api/dtmsvr")
    assert info(TRY, "http://dtm.internal:80/api/dtmsvr").require_dtm()
    assert info(TRY, "https://dtm.internal:443/api/dtmsvr").require_dtm()


def test_env_var_with_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTMCLI_SERVER", f" http://a:1/api/dtmsvr , {DTM}")
    assert info(TRY, DTM).require_dtm() == DTM
    with pytest.raises(BranchRequestError):
        info(TRY, "http://evil:1/api/dtmsvr").require_dtm()
    set_dtm_servers("http://evil:1/api/dtmsvr")  # the setting wins over the environment
    assert info(TRY, "http://evil:1/api/dtmsvr").require_dtm()
    with pytest.raises(BranchRequestError):
        info(TRY, DTM).require_dtm()


def test_bad_configuration_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DtmInvalidInput):
        set_dtm_servers("ftp://dtm/api")
    monkeypatch.setenv("DTMCLI_SERVER", "not a url")
    with pytest.raises(DtmInvalidInput, match="DTMCLI_SERVER"):
        info(TRY, DTM).require_dtm()


def test_nothing_configured_accepts_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dtmcli"):
        assert info(TRY, "http://anything:1/api").require_dtm() == "http://anything:1/api"
        info(TRY, "http://other:1/api").require_dtm()
    warnings = [r for r in caplog.records if "set_dtm_servers" in r.getMessage()]
    assert len(warnings) == 1 and "DTMCLI_SERVER" in warnings[0].getMessage()


def test_tcc_and_xa_refuse_a_forged_dtm_before_sending(evil: BranchService) -> None:
    set_dtm_servers(DTM)
    forged = f"{evil.base_url}/api/dtmsvr"
    with pytest.raises(BranchRequestError, match="not a trusted"):
        Tcc.from_query({**TRY, "dtm": forged})
    with pytest.raises(BranchRequestError, match="not a trusted"):
        register_xa_branch(info(XA_ACTION, forged))
    assert evil.calls() == []
    # An explicit dtm= is used instead of the query's: nothing to check.
    assert Tcc.from_query({**TRY, "dtm": forged}, dtm=DTM).gid == "G-ssrf"


def test_forged_dtm_over_http_is_400(evil: BranchService) -> None:
    set_dtm_servers(DTM)
    app = flask.Flask(__name__)

    @app.post("/try")
    @branch_handler
    def tcc_try(info: BranchInfo) -> Any:
        Tcc.from_info(info).call_branch({}, f"{DTM}/x", "", "")  # nested TCC: would call the query's dtm
        return None

    with serve_wsgi(app) as base:
        q = {**TRY, "dtm": f"{evil.base_url}/api/dtmsvr"}
        r = requests.post(f"{base}/try", params=q, json={}, timeout=10)
    assert r.status_code == 400 and "not a trusted DTM server" in r.json()["message"]
    assert evil.calls() == []


def test_xa_local_transaction_refuses_a_forged_dtm(evil: BranchService) -> None:
    import pymysql
    from services import MYSQL, require

    from dtmcli.barrier import xa_local_transaction

    require("mysql")
    set_dtm_servers(DTM)
    ran: list[Any] = []
    query = {**XA_ACTION, "gid": local_gid(), "dtm": f"{evil.base_url}/api/dtmsvr"}
    with pytest.raises(BranchRequestError, match="not a trusted"):
        xa_local_transaction(query, lambda: pymysql.connect(**MYSQL), ran.append)
    assert ran == [] and evil.calls() == []
