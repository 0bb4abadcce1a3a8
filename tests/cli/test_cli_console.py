"""The console entry points as separate processes: ``python -m dtmcli``, the ``dtmcli`` script, a terminal."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from dtmcli import DtmClient
from dtmcli.testing import BranchService, DtmTestServer

from .conftest import saga

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
ONGOING = (425, {"dtm_result": "ONGOING"})


def run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          **kwargs)  # type: ignore[call-overload]


def test_python_m_dtmcli_query(dtm: DtmTestServer, busi: BranchService) -> None:
    gid = saga(dtm, busi)
    r = run("dtmcli", "query", gid, "--dtm", dtm.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["gid:", gid]
    assert run("dtmcli", "query", gid, "--dtm", "http://127.0.0.1:1/api/dtmsvr").returncode == 3
    assert run("dtmcli", "list", "--since", "soon").returncode == 2


def test_console_script_is_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dtmcli": "dtmcli.cli:main"}
    installed = shutil.which("dtmcli", path=str(Path(sys.executable).parent))
    if installed:  # present after `pip install -e .`
        r = subprocess.run([installed, "ddl", "postgres"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "CREATE TABLE" in r.stdout


def test_ddl_matches_python_m_dtmcli_sql() -> None:
    for dialect in ("mysql", "mariadb", "postgres", "mongo"):
        old = run("dtmcli.sql", "ddl", dialect, "--table", "s.t")
        new = run("dtmcli", "ddl", dialect, "--table", "s.t")
        assert old.returncode == new.returncode == 0
        assert old.stdout == new.stdout != ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("module", [["dtmcli", "coordinator"], ["dtmcli.testing"]])
def test_coordinator_runs_until_sigterm(module: list[str]) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", *module, "--port", str(port), "--log-level", "WARNING"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = DtmClient(f"http://127.0.0.1:{port}/api/dtmsvr", timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.version().startswith("v1.19.0")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


def test_coordinator_help() -> None:
    r = run("dtmcli", "coordinator", "--help")
    assert r.returncode == 0 and "usage: dtmcli coordinator" in r.stdout and "--sqlite" in r.stdout


def _force_stop_at_a_terminal(url: str, gid: str, answer: bytes) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dtmcli", "force-stop", gid, "--dtm", url], cwd=ROOT,
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    seen = b""
    try:
        while b"[y/N]" not in seen:
            ready, _, _ = select.select([master], [], [], 20)
            assert ready, f"no prompt: {seen!r}"
            seen += os.read(master, 1024)
        os.write(master, answer)
        out, _ = proc.communicate(timeout=20)
    finally:
        os.close(master)
    return proc.returncode, out


def test_force_stop_asks_at_a_terminal(dtm: DtmTestServer, busi: BranchService) -> None:
    busi.route("/slow", ONGOING)
    gid = saga(dtm, busi, "/slow")
    code, _ = _force_stop_at_a_terminal(dtm.url, gid, b"n\n")
    assert code == 1 and dtm.query(gid).status == "submitted"
    code, out = _force_stop_at_a_terminal(dtm.url, gid, b"y\n")
    assert code == 0 and "stopped" in out and dtm.query(gid).status == "failed"
