"""Regressions from the CLI review: secrets, escapes, hangs, gids, JSON, exits."""

from __future__ import annotations

import io
import json
import socket
import time
import uuid
from typing import Any, Iterator

import pytest

from dtmcli import local_gid
from dtmcli.cli import main
from dtmcli.testing import BranchService, DtmTestServer

from .conftest import Cli

ESC = "\x1b]0;owned\x07\x1b[2J"


@pytest.fixture
def fake() -> Iterator[BranchService]:
    """Something at a DTM address that answers whatever a test routes."""
    with BranchService(default=(404, "no route")) as svc:
        yield svc


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdin=io.StringIO(""), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def trans(status: str = "submitted", **extra: Any) -> dict[str, Any]:
    t = {"gid": "g1", "trans_type": "saga", "status": status, "create_time": "2026-01-01 00:00:00"}
    t.update(extra)
    return {"transaction": t, "branches": [{"gid": "g1", "branch_id": "01", "op": "action", "status": "prepared",
                                            "url": f"http://x/{ESC}"}]}


# -- 2: secrets ------------------------------------------------------------------------------------


def test_doctor_never_shows_dtm_user_info(dtm: DtmTestServer) -> None:
    secret_url = dtm.url.replace("http://", "http://admin:TopSecret@")
    for json_flag in ((), ("--json",)):
        code, out, err = run("doctor", "--dtm", secret_url, *json_flag)
        assert code == 0, out + err
        assert "TopSecret" not in out + err and "admin" not in out + err
    assert "reachable" in out and "not measured" not in out  # the Date probe works with user info too


def test_unreachable_dtm_message_has_no_user_info() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run("--dtm", f"http://admin:TopSecret@127.0.0.1:{port}/api/dtmsvr", "query", "g")
    assert code == 3 and "cannot reach DTM" in err
    assert "TopSecret" not in err and "admin" not in err
    code, out, err = run("doctor", "--dtm", f"http://admin:TopSecret@127.0.0.1:{port}/api/dtmsvr")
    assert code == 3 and "TopSecret" not in out and "admin" not in out


@pytest.mark.parametrize("url", ["mysql://root:Sup3r/Secret@127.0.0.1:1/test",
                                 "mysql://root:Sup3r#Secret@127.0.0.1:1/test",
                                 "mysql://root:Sup3rSecret@127.0.0.1:1/test?ssl=Sup3rSecret"])
def test_doctor_db_url_password_never_shown(cli: Cli, url: str) -> None:
    r = cli("doctor", "--db", url)
    assert r.code == 1 and "Sup3r" not in r.out and "Secret" not in r.out
    assert "mysql" in r.out


def test_doctor_redis_query_password_never_shown(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("doctor", "--redis", f"redis://127.0.0.1:{port}/0?password=TopSecret")
    assert r.code == 1 and "TopSecret" not in r.out and f"redis://127.0.0.1:{port}/0" in r.out


# -- 3: a database port that never answers ---------------------------------------------------------


def test_doctor_does_not_hang_on_a_silent_mysql_port(cli: Cli) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)  # the kernel completes the handshake; nobody ever speaks
        port = silent.getsockname()[1]
        started = time.monotonic()
        r = cli("doctor", "--timeout-per-call", "1", "--db", f"mysql://root@127.0.0.1:{port}/test")
    assert r.code == 1 and "cannot connect" in r.out
    assert time.monotonic() - started < 8


# -- 4: terminal escapes, unknown status -----------------------------------------------------------


def test_watch_output_has_no_escapes_and_an_unknown_status_ends_it(fake: BranchService) -> None:
    fake.route("/api/dtmsvr/query", (200, trans("submitted", gid=f"g1{ESC}")), (200, trans(f"weird{ESC}")))
    code, out, err = run("--dtm", f"{fake.base_url}/api/dtmsvr", "watch", "g1", "--interval", "0.01",
                         "--timeout", "5")
    assert code == 1 and "does not know" in err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert len(fake.calls("/api/dtmsvr/query")) == 2


def test_dtm_error_message_and_doctor_version_are_sanitised(fake: BranchService) -> None:
    fake.route("/api/dtmsvr/forceStop", (200, {"dtm_result": "FAILURE", "message": f"no{ESC}"}))
    fake.route("/api/dtmsvr/version", (200, f"v1{ESC}"))
    fake.route("/api/dtmsvr/ping", (200, {"dtm_result": "SUCCESS"}))
    code, out, err = run("--dtm", f"{fake.base_url}/api/dtmsvr", "force-stop", "g1", "--yes")
    assert code == 1 and "\x1b" not in err and "\x07" not in err
    code, out, err = run("doctor", "--dtm", f"{fake.base_url}/api/dtmsvr")
    assert "v1" in out and "\x1b" not in out and "\x07" not in out


# -- 5: gids DTM stores ----------------------------------------------------------------------------


def test_read_and_admin_commands_take_gids_dtm_stores(cli: Cli, fake: BranchService) -> None:
    gid = f"order:{local_gid()}"
    r = cli("query", gid)
    assert r.code == 1 and "not found" in r.err  # asked, not refused as a usage error
    fake.route("/api/dtmsvr/forceStop", (200, {"dtm_result": "SUCCESS"}))
    fake.route("/api/dtmsvr/resetNextCronTime", (200, {"dtm_result": "SUCCESS"}))
    assert run("--dtm", f"{fake.base_url}/api/dtmsvr", "force-stop", "order:42", "--yes")[0] == 0
    assert run("--dtm", f"{fake.base_url}/api/dtmsvr", "retry", "order 42")[0] == 0
    assert [json.loads(c.body)["gid"] for c in fake.calls()] == ["order:42", "order 42"]


# -- 6/7: strict JSON ------------------------------------------------------------------------------


def test_json_escapes_lone_surrogates_and_nulls_non_finite_numbers(fake: BranchService) -> None:
    fake.route("/api/dtmsvr/query", (200, '{"transaction": {"gid": "g1", "status": "succeed", "x": "\\ud800", '
                                          '"n": NaN, "i": [Infinity]}, "branches": []}'))
    code, out, err = run("--dtm", f"{fake.base_url}/api/dtmsvr", "query", "g1", "--json")
    assert code == 0, err
    assert out.isascii() and "\\ud800" in out and "NaN" not in out and "Infinity" not in out
    parsed = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert parsed["transaction"]["n"] is None and parsed["transaction"]["i"] == [None]


# -- 8/9: exits ------------------------------------------------------------------------------------


def test_ctrl_c_exits_130_without_traceback(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("dtmcli.cli._query.run_watch", interrupted)
    r = cli("watch", "g1")
    assert r.code == 130 and "Traceback" not in r.err and r.err.count("\n") == 1


def test_coordinator_port_in_use_is_one_line_exit_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        code, _out, err = run("coordinator", "--host", "127.0.0.1", "--port", str(busy.getsockname()[1]))
    assert code == 2 and err.count("\n") == 1 and "cannot start" in err


@pytest.mark.parametrize("argv", [("list", "--since", "9" * 400 + "h"), ("watch", "g", "--interval", "inf"),
                                  ("watch", "g", "--timeout", "nan")])
def test_non_finite_durations_are_usage_errors(cli: Cli, argv: tuple[str, ...]) -> None:
    r = cli(*argv)
    assert r.code == 2 and "Traceback" not in r.err


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors_mean_dtm_unreachable(fake: BranchService, status: int) -> None:
    fake.route("/api/dtmsvr/query", (status, "<html>bad gateway</html>"))
    code, _out, err = run("--dtm", f"{fake.base_url}/api/dtmsvr", "--timeout-per-call", "2", "query", "g1")
    assert code == 3 and err.count("\n") == 1 and str(status) in err


# -- 1: doctor end to end --------------------------------------------------------------------------


def test_doctor_fails_a_barrier_table_without_its_unique_key(cli: Cli) -> None:
    import psycopg2
    from services import POSTGRES, require

    require("postgres")
    schema = f"dtmcli_keys_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(**POSTGRES)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"create schema {schema}")
            cur.execute(f"create table {schema}.barrier (id serial primary key, trans_type varchar(45), "
                        "gid varchar(128), branch_id varchar(128), op varchar(45), barrier_id varchar(45), "
                        "reason varchar(45))")
        r = cli("doctor", "--db", f"postgresql://postgres@{POSTGRES['host']}:5432/test", "--table", f"{schema}.barrier")
        assert r.code == 1 and "[missing_unique_key]" in r.out
        assert f"fix: ALTER TABLE {schema}.barrier ADD UNIQUE (gid, branch_id, op, barrier_id)" in r.out
    finally:
        with conn.cursor() as cur:
            cur.execute(f"drop schema if exists {schema} cascade")
        conn.close()
