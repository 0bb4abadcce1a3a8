"""SQLite persistence (a restart resumes unfinished work) and the command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from dtmcli import Saga
from dtmcli.testing import BranchService, DtmTestServer


def test_restart_resumes_unfinished_transactions(tmp_path: Path, branch_service: BranchService) -> None:
    db = str(tmp_path / "dtm.sqlite")
    branch_service.route("/a2", 500, 200)
    with DtmTestServer(sqlite_path=db) as dtm:
        saga = Saga(dtm.url, "PERSIST", retry_interval=1)
        saga.add(branch_service.url("/a1"), branch_service.url("/c1"), {"n": 1})
        saga.add(branch_service.url("/a2"), branch_service.url("/c2"), {"n": 2}).submit()
        dtm.wait_idle()
        assert dtm.query("PERSIST").status == "submitted"  # type: ignore[union-attr]
    with DtmTestServer(sqlite_path=db) as dtm:
        trans = dtm.query("PERSIST")
        assert trans is not None and trans.status == "submitted"
        assert trans.branch("01", "action").status == "succeed"  # type: ignore[union-attr]
        dtm.advance(5)
        assert dtm.query("PERSIST").status == "succeed"  # type: ignore[union-attr]
    assert [c.path for c in branch_service.calls()] == ["/a1", "/a2", "/a2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_in_real_time(branch_service: BranchService) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtmcli.testing", "--port", str(port), "--cron-interval", "0.1"],
        stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if requests.get(f"{base}/api/ping", timeout=1).json() == {"msg": "pong"}:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        branch_service.route("/a", 200)
        body = {"gid": "CLI", "trans_type": "saga", "wait_result": True, "payloads": ["{}"],
                "steps": [{"action": branch_service.url("/a"), "compensate": branch_service.url("/c")}]}
        resp = requests.post(f"{base}/api/dtmsvr/submit", data=json.dumps(body), timeout=5)
        assert resp.json() == {"dtm_result": "SUCCESS"}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "/api/dtmsvr/submit" in err and "saga CLI -> succeed" in err
