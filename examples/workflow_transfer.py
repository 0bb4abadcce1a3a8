"""Workflow: a bank transfer written as ordinary code, with one crash in the middle that DTM resumes.

Each ``wf.request`` is a recorded step (TransOut, then TransIn on the bank service) and ``on_rollback``
registers its compensation as the code runs. Three transfers:

1. 3 from user 1 to user 2: both steps succeed.
2. 3 from user 1 to the missing account 3: TransIn answers FAILURE, TransOut is compensated.
3. 3 from user 1 to user 2 in a child process that is SIGKILLed right after TransOut. DTM later calls this
   process's resume endpoint; the workflow runs again, TransOut is replayed from DTM's record (not called
   again) and only TransIn runs.

Run on its own against a DTM server and a running bank service (DTM must reach 127.0.0.1 of this machine):
    DTM_SERVER=http://localhost:36789/api/dtmsvr BANK_URL=http://localhost:8081/api/busi python workflow_transfer.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Optional

from flask import Flask
from werkzeug.serving import make_server

from dtmcli import DtmClient, DtmFailure, local_gid, workflow
from dtmcli.contrib.flask import workflow_resume_view

NAME = "example_transfer"
# DTM first resumes an unfinished workflow RETRY_INTERVAL s after prepareWorkflow (then every 10 s). 1 s keeps
# this demo quick; a real service sets it above its longest run, because DTM also resumes a workflow that is
# still running (another process would run it concurrently).
RETRY_INTERVAL = 1
TIMEOUT_TO_FAIL = RETRY_INTERVAL  # the name tests/e2e/test_flavours_examples.py waits on
_config = {"busi": "", "crash_after_out": False}


@workflow.register(NAME, retry_interval=RETRY_INTERVAL)
def transfer(wf: workflow.Workflow, data: bytes) -> bytes:
    """Move ``amount`` from ``from`` to ``to``: TransOut, then TransIn, each compensated if a later step fails."""
    req = json.loads(data)
    busi = _config["busi"]
    out = {"user_id": req["from"], "amount": req["amount"]}
    into = {"user_id": req["to"], "amount": req["amount"]}

    wf.new_branch().on_rollback(lambda bb: wf.request("POST", f"{busi}/TransOutCom", json=out))
    wf.request("POST", f"{busi}/TransOut", json=out)  # 409 from the bank -> DtmFailure: roll back
    if _config["crash_after_out"]:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # the process dies here
    wf.new_branch().on_rollback(lambda bb: wf.request("POST", f"{busi}/TransInCom", json=into))
    wf.request("POST", f"{busi}/TransIn", json=into)
    return f"moved {req['amount']} from {req['from']} to {req['to']}".encode()


class ResumeEndpoint:
    """This service's resume endpoint (``/api/workflow/resume``), which DTM calls to resume a workflow."""

    def __init__(self, port: int = 0) -> None:
        app = Flask("workflow_transfer")
        app.add_url_rule("/api/workflow/resume", view_func=workflow_resume_view(), methods=["GET", "POST"])
        self._server = make_server("127.0.0.1", port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}/api/workflow/resume"

    def __enter__(self) -> ResumeEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join()


def _input(to: int, amount: int) -> bytes:
    return json.dumps({"from": 1, "to": to, "amount": amount}).encode()


def _wait_final(dtm: str, gid: str, advance: Optional[Callable[[str], None]], timeout: float = 30.0) -> str:
    """Let DTM's resume cron run (``advance``, or real time) until ``gid`` is final."""
    client = DtmClient.for_url(dtm)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if advance is not None:
            advance(gid)
        else:
            client.reset_next_cron_time(gid)  # no need to wait for the next cron pass (SQL stores)
        trans = client.query(gid)
        if trans is not None and trans.is_final:
            return trans.status
        time.sleep(0.2)
    return "not final after 30 s"


def run(
    dtm: str, busi: str, amount: int = 3, advance: Optional[Callable[[str], None]] = None
) -> Iterator[tuple[str, str]]:
    """Run the three transfers, yielding (title, outcome) after each. ``advance(gid)`` lets DTM's time pass (tests)."""
    _config["busi"] = busi
    with ResumeEndpoint() as endpoint:
        workflow.init_http(dtm, endpoint.url)

        result = workflow.execute(NAME, local_gid(), _input(2, amount))
        yield f"workflow: {amount} from user 1 to user 2", (result or b"").decode()

        try:
            workflow.execute(NAME, local_gid(), _input(3, amount))
            yield "workflow to a missing account", "succeeded?!"
        except DtmFailure as exc:
            yield "workflow to a missing account", f"rolled back: {exc.message}"

        gid = local_gid()
        child = subprocess.run([sys.executable, __file__, "crash", dtm, busi, endpoint.url, gid, str(amount)])
        status = _wait_final(dtm, gid, advance)  # DTM calls endpoint.url, here, to finish the workflow
        yield "workflow: crash, then DTM resumes", f"{gid} {status} (crashed child exit {child.returncode})"


def _crash(dtm: str, busi: str, callback: str, gid: str, amount: str) -> None:
    """The child process: start the transfer and die right after TransOut."""
    _config.update(busi=busi, crash_after_out=True)
    workflow.init_http(dtm, callback)
    workflow.execute(NAME, gid, _input(2, int(amount)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["crash"]:
        _crash(*sys.argv[2:7])
    else:
        from _common import BUSI, DTM

        for title, outcome in run(DTM, BUSI):
            print(f"{title}: {outcome}")
