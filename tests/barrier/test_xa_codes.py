"""XA phase 2 recognises "no such transaction" by error code, not by English text (issue 10.8).

PostgreSQL: SQLSTATE 42704; MySQL/MariaDB: errno 1397 (XAER_NOTA). No non-English OS locale exists
on the test machine, so PostgreSQL's ``lc_messages`` cannot be switched here: the PostgreSQL tests
run real statements and give the real error the server's German text (from PostgreSQL's own
catalogue when installed), as a server with ``lc_messages = 'de_DE.UTF-8'`` would. MariaDB ships
its own translations, so its test switches ``lc_messages`` for real.
"""

from __future__ import annotations

import gettext
from typing import Any, Iterator, Optional

import pytest
from conftest import mysql_connect, query_all
from services import MYSQL, POSTGRES, require

from dtmcli import local_gid
from dtmcli.barrier import BarrierDatabaseError, xa_handle_phase2

_PG_NOT_FOUND = 'prepared transaction with identifier "%s" does not exist'


def _german(template: str) -> str:
    try:
        return gettext.translation("postgres-15", "/usr/share/locale", languages=["de"]).gettext(template)
    except OSError:  # catalogue not installed: the same sentence as PostgreSQL 15 translates it
        return "vorbereitete Transaktion mit Bezeichner »%s« existiert nicht"


def phase2(gid: str, op: str) -> dict[str, str]:
    return {"gid": gid, "trans_type": "xa", "branch_id": "01", "op": op}


def pg_connect(rewrite: Optional[type] = None) -> Any:
    """A psycopg 3 connection whose cursors give server errors German text (or raise ``rewrite``)."""
    import psycopg

    class LocalisedCursor(psycopg.Cursor):  # type: ignore[type-arg]
        def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
            try:
                return super().execute(query, params, **kw)
            except psycopg.Error as exc:
                if rewrite is not None:
                    raise rewrite(f'relation "{query}" does not exist') from None
                if exc.sqlstate != "42704":
                    raise
                xid = str(query).split("'")[1]
                raise type(exc)(_german(_PG_NOT_FOUND).replace("%s", xid)) from None

    return psycopg.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                           dbname=POSTGRES["dbname"], cursor_factory=LocalisedCursor)


@pytest.fixture
def pg() -> Iterator[Any]:
    require("postgres")
    conn = pg_connect()
    yield conn
    conn.close()


def reasons(conn: Any, gid: str) -> list[str]:
    return [r[0] for r in query_all(conn, "select reason from dtm_barrier.barrier where gid = %s", (gid,))]


def test_postgres_unknown_xid_in_german_is_already_done(pg: Any) -> None:
    """Before: the German text matched no English word and DTM's commit/rollback was retried forever."""
    gid = local_gid()
    pg.autocommit = True
    with pytest.raises(Exception) as probe:  # the server really answers 42704, with German text here
        pg.cursor().execute(f"commit prepared '{gid}-01'")
    pg.autocommit = False
    assert getattr(probe.value, "sqlstate", None) == "42704" and "does not exist" not in str(probe.value)
    # Recognised as "no such xid" (else: "barrier xa commit failed"); with no committed action row the
    # branch's work is lost, which a commit must not answer with success.
    with pytest.raises(BarrierDatabaseError, match="no committed action barrier row"):
        xa_handle_phase2(phase2(gid, "commit"), pg)
    xa_handle_phase2(phase2(gid, "rollback"), pg)
    assert reasons(pg, gid) == ["rollback"]


def test_postgres_real_prepared_commit_then_repeat_in_german(pg: Any) -> None:
    require("postgres")
    gid = local_gid()
    other = pg_connect()
    try:
        other.autocommit = True
        other.execute("begin")
        other.execute("insert into dtm_barrier.barrier(trans_type, gid, branch_id, op, barrier_id, reason) "
                      "values ('xa', %s, '01', 'action', '01', 'action')", (gid,))  # as the action writes it
        other.execute(f"prepare transaction '{gid}-01'")
    finally:
        other.close()
    xa_handle_phase2(phase2(gid, "commit"), pg)
    assert query_all(pg, "select count(*) from pg_prepared_xacts where gid = %s", (f"{gid}-01",)) == [(0,)]
    xa_handle_phase2(phase2(gid, "commit"), pg)  # DTM's repeat: not found, by code -> success


def test_other_errors_saying_does_not_exist_are_not_swallowed() -> None:
    """Before: any message containing "does not exist" counted as "already committed"."""
    require("postgres")
    import psycopg

    conn = pg_connect(rewrite=psycopg.errors.UndefinedTable)
    try:
        with pytest.raises(BarrierDatabaseError, match="does not exist"):
            xa_handle_phase2(phase2(local_gid(), "commit"), conn)
    finally:
        conn.close()


def test_mariadb_unknown_xid_with_translated_messages() -> None:
    """MariaDB translates its messages itself: lc_messages is switched for real."""
    require("mysql")
    gid = local_gid()
    conn = mysql_connect()
    try:
        conn.cursor().execute("set lc_messages = 'es_ES'")
        conn.autocommit(True)
        with pytest.raises(Exception) as probe:
            conn.cursor().execute(f"xa commit '{gid}-01'")
        conn.autocommit(False)
        assert probe.value.args[0] == 1397 and "desconocido" in probe.value.args[1]
        with pytest.raises(BarrierDatabaseError, match="no committed action barrier row"):  # not "failed"
            xa_handle_phase2(phase2(gid, "commit"), conn)
        xa_handle_phase2(phase2(gid, "rollback"), conn)
        assert reasons(conn, gid) == ["rollback"]
    finally:
        conn.close()


def test_mariadb_decision_uses_the_errno_not_the_text() -> None:
    """Errno 1397 with a text lacking 'XAER_NOTA' is still "not found"; other errnos are not."""
    require("mysql")
    import pymysql
    from pymysql.cursors import Cursor

    class TextlessCursor(Cursor):
        def execute(self, query: Any, args: Any = None) -> int:
            try:
                return int(super().execute(query, args))
            except pymysql.err.OperationalError as exc:
                if exc.args[0] == 1397:
                    raise pymysql.err.OperationalError(1397, "未知的XID") from None
                raise

    conn = pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"], password=MYSQL["password"],
                           database=MYSQL["database"], cursorclass=TextlessCursor)
    try:
        # Recognised as "no such xid" (else: "barrier xa commit failed"); no committed action row: an error.
        with pytest.raises(BarrierDatabaseError, match="no committed action barrier row"):
            xa_handle_phase2(phase2(local_gid(), "commit"), conn)
    finally:
        conn.close()


def test_phase2_takes_a_connection_factory() -> None:
    """The same connection sources as @barrier(db=...): a factory is opened and closed for the call (10.9)."""
    require("mysql")
    opened: list[Any] = []

    def factory() -> Any:
        opened.append(mysql_connect())
        return opened[-1]

    gid = local_gid()
    xa_handle_phase2(phase2(gid, "rollback"), factory)
    assert len(opened) == 1 and not opened[0].open
    check = mysql_connect()
    try:
        assert reasons(check, gid) == ["rollback"]
    finally:
        check.close()
