"""A workflow service process for tests/workflow/test_crash_resume.py (run as a script, configured by env vars).

It serves the workflow resume endpoint on ``127.0.0.1:$WF_PORT/api/workflow/resume`` (Flask + werkzeug for
``WF_FLAVOUR=sync``, FastAPI + uvicorn for ``async``), writes ``ready`` on stdout, then, when ``WF_GID`` is set,
executes the workflow ``transfer3`` for that gid and writes one JSON line with the outcome (``result``,
``failure`` or ``error``). It then serves until it is terminated.

The workflow: three HTTP steps ``$WF_BUSI/s1..s3`` (each with an ``on_rollback`` HTTP callback to
``$WF_BUSI/u1..u3``); its result is the JSON list of the three step bodies.

- ``WF_CRASH_AFTER=N``: SIGKILL this process right after step N returned (its progress recorded).
- ``WF_STRIP_SYNC=1``: send workflow registerBranch without ``"sync"`` (as the Go client does), to show what the
  coordinator's default mode then keeps: nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from typing import Any

NAME = "transfer3"
TIMEOUT_TO_FAIL = int(os.environ.get("WF_TIMEOUT_TO_FAIL", "3"))
FLAVOUR = os.environ.get("WF_FLAVOUR", "sync")
DTM = os.environ["WF_DTM"]
BUSI = os.environ["WF_BUSI"]
PORT = int(os.environ["WF_PORT"])
CALLBACK = f"http://127.0.0.1:{PORT}/api/workflow/resume"
CRASH_AFTER = int(os.environ.get("WF_CRASH_AFTER", "0"))


def emit(**line: Any) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def after_step(n: int) -> None:
    if n == CRASH_AFTER:
        emit(crash=n)
        os.kill(os.getpid(), signal.SIGKILL)


class StripSync:
    """A transport wrapper that drops ``sync`` from registerBranch bodies (sync or async inner transport)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def request(self, method: str, url: str, *, body: Any = None, **kwargs: Any) -> Any:
        if url.endswith("/registerBranch") and body:
            data = json.loads(body)
            data.pop("sync", None)
            body = json.dumps(data).encode()
        return self.inner.request(method, url, body=body, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def dtm_target(client_class: Any) -> Any:
    if os.environ.get("WF_STRIP_SYNC") != "1":
        return DTM
    plain = client_class(DTM)
    return client_class(DTM, transport=StripSync(plain.transport))


def run_sync() -> None:
    from flask import Flask
    from werkzeug.serving import make_server

    from dtmcli import DtmClient, DtmFailure, workflow
    from dtmcli.contrib.flask import workflow_resume_view

    @workflow.register(NAME, timeout_to_fail=TIMEOUT_TO_FAIL)
    def transfer3(wf: workflow.Workflow, data: bytes) -> bytes:
        req = json.loads(data)
        bodies = []
        for n in (1, 2, 3):
            wf.new_branch().on_rollback(lambda bb, n=n: wf.request("POST", f"{BUSI}/u{n}", json=req))
            bodies.append(wf.request("POST", f"{BUSI}/s{n}", json=req).json())
            after_step(n)
        return json.dumps(bodies).encode()

    workflow.init_http(dtm_target(DtmClient), CALLBACK)
    app = Flask("wf_service")
    app.add_url_rule("/api/workflow/resume", view_func=workflow_resume_view(), methods=["GET", "POST"])
    server = make_server("127.0.0.1", PORT, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    emit(ready=True)
    gid = os.environ.get("WF_GID")
    if gid:
        try:
            result = workflow.execute(NAME, gid, os.environ.get("WF_INPUT", "{}").encode())
            emit(result=(result or b"").decode())
        except DtmFailure as exc:
            emit(failure=str(exc))
        except Exception as exc:
            emit(error=repr(exc))
    thread.join()


async def run_async() -> None:
    import uvicorn
    from fastapi import FastAPI

    from dtmcli import DtmFailure
    from dtmcli.asyncio import AsyncDtmClient, workflow
    from dtmcli.contrib.fastapi import workflow_resume_endpoint

    @workflow.register(NAME, timeout_to_fail=TIMEOUT_TO_FAIL)
    async def transfer3(wf: workflow.Workflow, data: bytes) -> bytes:
        req = json.loads(data)
        bodies = []
        for n in (1, 2, 3):

            async def undo(bb: Any, n: int = n) -> None:
                await wf.request("POST", f"{BUSI}/u{n}", json=req)

            wf.new_branch().on_rollback(undo)
            bodies.append((await wf.request("POST", f"{BUSI}/s{n}", json=req)).json())
            after_step(n)
        return json.dumps(bodies).encode()

    workflow.init_http(dtm_target(AsyncDtmClient), CALLBACK)
    app = FastAPI()
    app.add_api_route("/api/workflow/resume", workflow_resume_endpoint(), methods=["GET", "POST"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=PORT, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # raises what stopped it (e.g. the port is taken)
            raise SystemExit("uvicorn stopped")
        await asyncio.sleep(0.01)
    emit(ready=True)
    gid = os.environ.get("WF_GID")
    if gid:
        try:
            result = await workflow.execute(NAME, gid, os.environ.get("WF_INPUT", "{}").encode())
            emit(result=(result or b"").decode())
        except DtmFailure as exc:
            emit(failure=str(exc))
        except Exception as exc:
            emit(error=repr(exc))
    await serving


if __name__ == "__main__":
    if FLAVOUR == "async":
        asyncio.run(run_async())
    else:
        run_sync()
