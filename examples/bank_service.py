"""A small bank: the branch service every example transfers money through.

Two accounts (user 1 and user 2, 100 each). Every handler is a DTM branch: it reads the branch
identity from the query string (``dtmcli.branch.BranchInfo``) and answers the way DTM expects
(200 success, 409 FAILURE to roll back).

With MariaDB/MySQL reachable (``DTM_EXAMPLE_MYSQL=host:port``, default 127.0.0.1:3306, user root),
balances live in ``dtm_example.account`` and each handler runs its UPDATE inside the
sub-transaction barrier, so duplicate calls, null compensations and late tries are harmless.
Otherwise an in-memory ledger stands in and imitates what the barrier does.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Optional, Protocol

import flask
from werkzeug.serving import make_server

from dtmcli import DtmFailure
from dtmcli.barrier import BranchBarrier, create_schema
from dtmcli.branch import BranchInfo
from dtmcli.contrib.flask import branch_handler, branch_payload

log = logging.getLogger("bank")
START_BALANCE = 100


class Ledger(Protocol):
    """Where balances live."""

    kind: str

    def adjust(self, info: BranchInfo, user_id: int, amount: int) -> None: ...

    def balances(self) -> dict[int, int]: ...


class MemoryLedger:
    """Balances in a dict. Remembers which (gid, branch, op) ran, as the barrier would in SQL."""

    kind = "in-memory"

    def __init__(self) -> None:
        self._balances = {1: START_BALANCE, 2: START_BALANCE}
        self._done: set[tuple[str, str, str]] = set()
        self.committed_msgs: set[str] = set()
        self._lock = threading.Lock()

    def adjust_local(self, gid: str, user_id: int, amount: int) -> None:
        """A msg's local step: apply once and remember it, for QueryPrepared."""
        with self._lock:
            if gid in self.committed_msgs:
                return
            _apply(self._balances, user_id, amount)
            self.committed_msgs.add(gid)

    def adjust(self, info: BranchInfo, user_id: int, amount: int) -> None:
        origin = {"compensate": "action", "cancel": "try"}.get(info.op)
        with self._lock:
            if (info.gid, info.branch_id, info.op) in self._done:
                return  # duplicate delivery
            if origin and (info.gid, info.branch_id, origin) not in self._done:
                # null compensation: the forward op never took effect; block it from running late
                self._done.update({(info.gid, info.branch_id, origin), (info.gid, info.branch_id, info.op)})
                return
            _apply(self._balances, user_id, amount)  # raises before anything is recorded, like a rollback
            self._done.add((info.gid, info.branch_id, info.op))

    def balances(self) -> dict[int, int]:
        with self._lock:
            return dict(self._balances)


def _apply(balances: dict[int, int], user_id: int, amount: int) -> None:
    if user_id not in balances:
        raise DtmFailure(f"no account {user_id}")
    if balances[user_id] + amount < 0:
        raise DtmFailure(f"insufficient balance in account {user_id}")
    balances[user_id] += amount


class MysqlLedger:
    """Balances in MariaDB/MySQL, every change made inside the sub-transaction barrier."""

    kind = "MariaDB + barrier"

    def __init__(self, host: str = "127.0.0.1", port: int = 3306) -> None:
        import pymysql

        self._connect: Callable[[], Any] = lambda: pymysql.connect(host=host, port=port, user="root", password="")
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS dtm_example")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS dtm_example.account (user_id INT PRIMARY KEY, balance INT NOT NULL)"
            )
            cur.execute("REPLACE INTO dtm_example.account VALUES (1, %s), (2, %s)", (START_BALANCE, START_BALANCE))
            conn.commit()
            create_schema(conn)  # dtm_barrier.barrier, if missing

    def connect(self) -> Any:
        """A new connection (the XA handlers need a dedicated one)."""
        return self._connect()

    def adjust(self, info: BranchInfo, user_id: int, amount: int) -> None:
        with self._connect() as conn:
            BranchBarrier.from_info(info).call(conn, lambda c: self.update(c, user_id, amount))

    @staticmethod
    def update(conn: Any, user_id: int, amount: int) -> None:
        """The business SQL: one guarded UPDATE (bound parameters, as always)."""
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE dtm_example.account SET balance = balance + %s WHERE user_id = %s AND balance + %s >= 0",
                (amount, user_id, amount),
            )
            if cur.rowcount != 1:
                raise DtmFailure(f"insufficient balance or no account {user_id}")

    def balances(self) -> dict[int, int]:
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT user_id, balance FROM dtm_example.account ORDER BY user_id")
            return {int(u): int(b) for u, b in cur.fetchall()}


def make_ledger() -> Ledger:
    """MariaDB when reachable, else the in-memory ledger."""
    host, _, port = os.environ.get("DTM_EXAMPLE_MYSQL", "127.0.0.1:3306").partition(":")
    if os.environ.get("DTM_EXAMPLE_MEMORY") != "1":
        try:
            return MysqlLedger(host, int(port or 3306))
        except Exception as exc:
            log.warning("MariaDB not usable (%s); using the in-memory ledger", exc)
    return MemoryLedger()


def make_app(ledger: Ledger) -> flask.Flask:
    """The Flask app with saga, TCC, msg and XA handlers."""
    app = flask.Flask("bank")

    def amount_of(info: BranchInfo) -> tuple[int, int]:
        body = branch_payload(info) or {}
        return int(body.get("user_id", 0)), int(body["amount"])

    # Saga: action and compensation for each side of the transfer.
    @app.route("/api/busi/TransOut", methods=["POST"])
    @branch_handler
    def trans_out(info: BranchInfo) -> None:
        user, amount = amount_of(info)
        ledger.adjust(info, user, -amount)

    @app.route("/api/busi/TransOutCom", methods=["POST"])
    @branch_handler
    def trans_out_com(info: BranchInfo) -> None:
        user, amount = amount_of(info)
        ledger.adjust(info, user, amount)

    @app.route("/api/busi/TransIn", methods=["POST"])
    @branch_handler
    def trans_in(info: BranchInfo) -> None:
        user, amount = amount_of(info)
        ledger.adjust(info, user, amount)

    @app.route("/api/busi/TransInCom", methods=["POST"])
    @branch_handler
    def trans_in_com(info: BranchInfo) -> None:
        user, amount = amount_of(info)
        ledger.adjust(info, user, -amount)

    # TCC: try moves the money, confirm has nothing left to do, cancel moves it back.
    @app.route("/api/busi/TccTry", methods=["POST"])
    @branch_handler
    def tcc_try(info: BranchInfo) -> None:
        user, amount = amount_of(info)
        ledger.adjust(info, user, amount)

    @app.route("/api/busi/TccConfirm", methods=["POST"])
    @branch_handler
    def tcc_confirm(info: BranchInfo) -> None:
        return None

    @app.route("/api/busi/TccCancel", methods=["POST"])
    @branch_handler
    def tcc_cancel(info: BranchInfo) -> None:
        user, amount = amount_of(info)
        ledger.adjust(info, user, -amount)

    # 2-phase message: DTM asks here whether the local transaction of a prepared msg committed.
    @app.route("/api/busi/QueryPrepared", methods=["GET"])
    @branch_handler
    def query_prepared(info: BranchInfo) -> None:
        if isinstance(ledger, MysqlLedger):
            with ledger.connect() as conn:
                BranchBarrier.from_info(info).query_prepared(conn)  # FAILURE unless the local transaction committed
        elif isinstance(ledger, MemoryLedger) and info.gid not in ledger.committed_msgs:
            raise DtmFailure("local transaction not committed")

    # XA: op=action runs the local XA transaction; op=commit/rollback is DTM's phase 2.
    @app.route("/api/busi/TransInXa", methods=["POST"])
    @branch_handler
    def trans_in_xa(info: BranchInfo) -> None:
        from dtmcli.barrier import xa_handle_phase2, xa_local_transaction

        if not isinstance(ledger, MysqlLedger):
            raise DtmFailure("the XA example needs MariaDB")
        conn = ledger.connect()
        try:
            if info.op == "action":
                user, amount = amount_of(info)
                xa_local_transaction(info, conn, lambda c: MysqlLedger.update(c, user, amount))
            else:
                xa_handle_phase2(info, conn)
        finally:
            conn.close()

    return app


class BankServer:
    """The bank app served on 127.0.0.1 from a background thread."""

    def __init__(self, ledger: Optional[Ledger] = None, port: int = 0) -> None:
        self.ledger = ledger if ledger is not None else make_ledger()
        self._server = make_server("127.0.0.1", port, make_app(self.ledger), threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}/api/busi"

    def __enter__(self) -> BankServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join()
