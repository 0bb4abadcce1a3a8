"""``dtmcli query/list/watch/force-stop/retry/ddl``: real HTTP against the embedded coordinator."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from dtmcli import Tcc, local_gid, tcc_global_transaction
from dtmcli.barrier import ddl
from dtmcli.cli import _query, main
from dtmcli.cli._base import dtm_url
from dtmcli.testing import BranchService, DtmTestServer

from .conftest import Cli, saga

FAILURE = (409, {"dtm_result": "FAILURE"})
ONGOING = (425, {"dtm_result": "ONGOING"})
UNREACHABLE = "http://127.0.0.1:1/api/dtmsvr"


def tcc(dtm: DtmTestServer, busi: BranchService) -> str:
    gid = local_gid()

    def body(t: Tcc) -> None:
        t.call_branch({"n": 1}, busi.url("/try"), busi.url("/confirm"), busi.url("/cancel"))

    tcc_global_transaction(dtm.url, gid, body)
    dtm.wait_idle()
    return gid


# -- query ---------------------------------------------------------------------------------------


def test_query_shows_the_transaction_and_its_branches(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/fail", FAILURE)
    gid = saga(dtm, busi, "/fail")
    r = cli("query", gid)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["gid:", gid]
    assert ["status:", "failed"] in [line.split() for line in lines]
    assert "rollback reason:" in r.out and "/fail return failed" in r.out
    header = next(line for line in lines if line.startswith("BRANCH"))
    assert header.split()[:4] == ["BRANCH", "OP", "STATUS", "URL"]
    rows = {tuple(line.split()[:4]) for line in lines[lines.index(header) + 1:]}
    assert ("02", "action", "failed", busi.url("/fail")) in rows
    assert ("01", "compensate", "succeed", busi.url("/a-c")) in rows


def test_query_json_is_dtms_query_answer(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    gid = saga(dtm, busi)
    r = cli("query", gid, "--json")
    assert r.code == 0
    assert json.loads(r.out) == dtm.query_json(gid)


def test_query_a_tcc(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    gid = tcc(dtm, busi)
    r = cli("query", gid)
    assert r.code == 0 and ["type:", "tcc"] in [line.split() for line in r.out.splitlines()]
    assert any(line.split()[:3] == ["01", "confirm", "succeed"] for line in r.out.splitlines())


def test_query_unknown_gid_exits_1(cli: Cli) -> None:
    r = cli("query", local_gid())
    assert r.code == 1 and r.out == "" and "not found" in r.err


def test_query_bad_gid_is_a_usage_error(cli: Cli) -> None:
    r = cli("query", "no;semicolons")  # DTM strips ';', so no stored gid has one
    assert r.code == 2 and "gid" in r.err


def test_options_before_the_command_and_dtmcli_server(cli: Cli, dtm: DtmTestServer, busi: BranchService,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gid = saga(dtm, busi)
    assert json.loads(cli("--json", "query", gid).out)["transaction"]["gid"] == gid
    assert cli("--dtm", dtm.url, "query", gid, dtm=None).out.startswith("gid:")
    monkeypatch.setenv("DTMCLI_SERVER", f" {dtm.url} ,{UNREACHABLE}")
    r = cli("query", gid, dtm=None)
    assert r.code == 0 and gid in r.out
    assert dtm_url(None) == dtm.url
    monkeypatch.delenv("DTMCLI_SERVER")
    assert dtm_url(None) == "http://localhost:36789/api/dtmsvr"
    assert dtm_url("http://x:1/api/dtmsvr") == "http://x:1/api/dtmsvr"


# -- list ----------------------------------------------------------------------------------------


def test_list_filters_by_status_and_type(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/fail", FAILURE)
    ok, failed, t = saga(dtm, busi), saga(dtm, busi, "/fail"), tcc(dtm, busi)
    r = cli("list")
    assert r.code == 0
    assert {line.split()[0] for line in r.out.splitlines()[1:]} == {ok, failed, t}
    assert [row["gid"] for row in json.loads(cli("list", "--status", "failed", "--json").out)] == [failed]
    assert [row["gid"] for row in json.loads(cli("list", "--type", "tcc", "--json").out)] == [t]
    assert cli("list", "--type", "xa").out == "no transactions\n"


def test_list_follows_the_cursor_over_pages(cli: Cli, dtm: DtmTestServer, busi: BranchService,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gids = {saga(dtm, busi) for _ in range(5)}
    monkeypatch.setattr(_query, "_PAGE", 2)
    rows = json.loads(cli("list", "--json").out)
    assert sorted(row["gid"] for row in rows) == sorted(gids)
    limited = json.loads(cli("list", "--json", "--limit", "3").out)
    assert len(limited) == 3 and {row["gid"] for row in limited} <= gids


def test_list_since(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    old = saga(dtm, busi)  # the coordinator's clock is two hours behind
    dtm.clock.set(time.time())
    new = saga(dtm, busi)
    assert [row["gid"] for row in json.loads(cli("list", "--since", "1h", "--json").out)] == [new]
    assert {row["gid"] for row in json.loads(cli("list", "--since", "3h", "--json").out)} == {old, new}


@pytest.mark.parametrize("argv", [["list", "--since", "yesterday"], ["list", "--since", "0m"],
                                  ["list", "--limit", "0"], ["list", "--status", "done"], [],
                                  ["watch", "g", "--interval", "-1"], ["frobnicate"]])
def test_usage_errors_exit_2(cli: Cli, argv: list[str]) -> None:
    assert cli(*argv).code == 2


def test_help_exits_0(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--help", dtm=None).code == 0
    assert "Exit codes" in capsys.readouterr().out


# -- watch ---------------------------------------------------------------------------------------


def test_watch_follows_until_succeed(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/slow", ONGOING, 200)
    gid = saga(dtm, busi, "/slow")
    assert dtm.query(gid).status == "submitted"
    out, err = io.StringIO(), io.StringIO()
    codes: list[int] = []
    argv = ["watch", gid, "--interval", "0.02", "--dtm", dtm.url]
    runner = threading.Thread(target=lambda: codes.append(main(argv, stdout=out, stderr=err)))
    runner.start()
    deadline = time.monotonic() + 10
    while "submitted" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    dtm.advance(11)  # the retry of /slow comes due and succeeds
    runner.join(10)
    assert codes == [0], err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0] == f"transaction {gid}: submitted"
    assert f"transaction {gid}: succeed" in lines
    # /slow shows as prepared first, then as succeed once it changed
    slow = [line for line in lines if "02 action" in line]
    assert [s.split()[3] for s in slow] == ["prepared", "succeed"]
    assert lines.index(slow[0]) < lines.index(f"transaction {gid}: succeed") <= lines.index(slow[1]) + 1


def test_watch_failed_exits_1_json_lines(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/fail", FAILURE)
    gid = saga(dtm, busi, "/fail")
    r = cli("watch", gid, "--json", "--interval", "0.01")
    assert r.code == 1
    assert [json.loads(line)["transaction"]["status"] for line in r.out.splitlines()] == ["failed"]


def test_watch_timeout_and_unknown(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/slow", ONGOING)
    gid = saga(dtm, busi, "/slow")
    started = time.monotonic()
    r = cli("watch", gid, "--interval", "0.05", "--timeout", "0.3")
    assert r.code == 1 and "still submitted" in r.err
    assert time.monotonic() - started < 3
    assert cli("watch", local_gid()).code == 1


# -- force-stop / retry --------------------------------------------------------------------------


def test_force_stop_with_yes(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/slow", ONGOING)
    gid = saga(dtm, busi, "/slow")
    r = cli("force-stop", gid, "--yes")
    assert r.code == 0, r.err
    assert dtm.query(gid).status == "failed"
    # DTM refuses to stop a final transaction
    again = cli("force-stop", gid, "-y")
    assert again.code == 1


def test_force_stop_without_a_terminal_needs_yes(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/slow", ONGOING)
    gid = saga(dtm, busi, "/slow")
    r = cli("force-stop", gid, stdin="y\n")  # piped input is not a confirmation
    assert r.code == 2 and "--yes" in r.err
    assert dtm.query(gid).status == "submitted"


def test_retry_makes_the_transaction_due_now(cli: Cli, dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/slow", ONGOING, 200)
    gid = saga(dtm, busi, "/slow")
    dtm.run_due()
    assert dtm.query(gid).status == "submitted"  # not due for another 10 s
    r = cli("retry", gid)
    assert r.code == 0, r.err
    dtm.run_due()
    dtm.wait_idle()
    assert dtm.query(gid).status == "succeed"


@pytest.mark.parametrize("argv", [["query", "g"], ["list"], ["watch", "g"], ["retry", "g"], ["force-stop", "g", "-y"]])
def test_unreachable_dtm_exits_3(cli: Cli, argv: list[str]) -> None:
    r = cli(*argv, dtm=UNREACHABLE)
    assert r.code == 3 and "cannot reach DTM" in r.err


# -- ddl -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["mysql", "mariadb", "postgres", "mongo"])
def test_ddl_prints_the_barrier_ddl(cli: Cli, dialect: str) -> None:
    r = cli("ddl", dialect, "--table", "shop.barrier", dtm=None)
    assert r.code == 0 and r.out == ddl(dialect, "shop.barrier")
    assert cli("ddl", dialect, dtm=None).out == ddl(dialect)


def test_ddl_bad_table_is_a_usage_error(cli: Cli) -> None:
    r = cli("ddl", "mysql", "--table", "x; drop table y", dtm=None)
    assert r.code == 2 and r.out == ""
