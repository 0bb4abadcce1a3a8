"""Crash and resume with real processes: a workflow service (tests/workflow/_wf_service.py, sync on Flask or
asyncio on FastAPI) is SIGKILLed right after step N, a fresh service process starts on the same port, and the
coordinator resumes the workflow through the resume endpoint. The branch service runs in this test process and
counts every call: steps before the crash are never called again, the rest run once, compensations run in
reverse on FAILURE, and the final status and result are right. Same with a transient error (500 from a branch
the first time) instead of a crash.

The coordinator is the ``dtm`` facade: in process (manual clock: the resume is instant, and in its default mode
workflow progress is stored only because the SDK sends ``"sync": "1"``), or a real DTM with ``--dtm-server URL``
(real time: ``timeout_to_fail`` is 3 s). ``test_without_sync_the_default_coordinator_keeps_nothing`` shows the
other side: the same crash with ``sync`` stripped from registerBranch (what the Go client sends) re-runs every
step.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dtmcli import local_gid
from dtmcli.testing import Answer, BranchService, DtmFacade

SERVICE = Path(__file__).with_name("_wf_service.py")
TIMEOUT_TO_FAIL = 3
INPUT = {"user_id": 1, "amount": 30}
FLAVOURS = pytest.mark.parametrize("flavour", ["sync", "async"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """One workflow service process and the JSON lines it wrote."""

    proc: subprocess.Popen[str]
    lines: list[dict[str, Any]] = field(default_factory=list)

    def read_until(self, key: str, timeout: float = 30.0) -> dict[str, Any]:
        """Read stdout lines until one has ``key`` (the process dying first is an error)."""
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                for line in self.lines:
                    if key in line:
                        return line
                if not sel.select(timeout):
                    raise TimeoutError(f"no {key!r} from the service after {timeout} s: {self.lines}")
                raw = self.proc.stdout.readline()
                if not raw:
                    self.proc.wait(5)
                    raise AssertionError(f"service exited ({self.proc.returncode}) before {key!r}: {self.lines}")
                self.lines.append(json.loads(raw))
        finally:
            sel.close()

    def wait_killed(self, timeout: float = 30.0) -> None:
        """Wait for the process to die of SIGKILL, reading what it wrote before."""
        assert self.proc.wait(timeout) == -signal.SIGKILL, self.lines
        assert self.proc.stdout is not None
        self.lines += [json.loads(line) for line in self.proc.stdout.read().splitlines()]


class Services:
    """Starts workflow service processes on one resume port, and kills whatever is left at the end."""

    def __init__(self, flavour: str, dtm: DtmFacade, busi: BranchService) -> None:
        self.flavour = flavour
        self.port = free_port()
        self.env = {
            **os.environ,
            "WF_FLAVOUR": flavour,
            "WF_DTM": dtm.url,
            "WF_BUSI": busi.url("/bank"),
            "WF_PORT": str(self.port),
            "WF_TIMEOUT_TO_FAIL": str(TIMEOUT_TO_FAIL),
            "WF_INPUT": json.dumps(INPUT),
            "PYTHONUNBUFFERED": "1",
        }
        self.started: list[Service] = []

    def start(self, gid: str = "", crash_after: int = 0, strip_sync: bool = False) -> Service:
        env = {
            **self.env,
            "WF_GID": gid,
            "WF_CRASH_AFTER": str(crash_after),
            "WF_STRIP_SYNC": "1" if strip_sync else "",
        }
        proc = subprocess.Popen([sys.executable, str(SERVICE)], env=env, stdout=subprocess.PIPE, text=True)
        service = Service(proc)
        self.started.append(service)
        service.read_until("ready")
        return service

    def close(self) -> None:
        for service in self.started:
            if service.proc.poll() is None:
                service.proc.terminate()  # our own child, by its handle
                try:
                    service.proc.wait(10)
                except subprocess.TimeoutExpired:
                    service.proc.kill()
                    service.proc.wait(10)
            if service.proc.stdout is not None:
                service.proc.stdout.close()


@pytest.fixture
def services(request: pytest.FixtureRequest, dtm: DtmFacade, branch_service: BranchService) -> Iterator[Services]:
    s = Services(request.getfixturevalue("flavour"), dtm, branch_service)
    try:
        yield s
    finally:
        s.close()


def counting(svc: BranchService, *first: Any) -> None:
    """Each step ``/bank/sN`` answers with its call number (after the scripted ``first`` answers of s2), so a
    replayed result is told apart from a repeated call."""
    seq = itertools.count(1)

    def numbered(call: Any) -> Answer:
        return Answer(200, {"dtm_result": "SUCCESS", "call": next(seq)})

    svc.route("/bank/s1", numbered)
    svc.route("/bank/s2", *first, numbered)
    svc.route("/bank/s3", numbered)


def step_calls(svc: BranchService) -> list[str]:
    return [f"{c.path.rsplit('/', 1)[1]}:{c.op}:{c.branch_id}" for c in svc.calls()]


def crash(services: Services, svc: BranchService, gid: str, after: int, strip_sync: bool = False) -> None:
    """Run the workflow in a service that SIGKILLs itself right after step ``after``; check what it called."""
    first = services.start(gid, crash_after=after, strip_sync=strip_sync)
    first.wait_killed()
    assert first.lines[-1] == {"crash": after}
    assert step_calls(svc) == [f"s{n}:action:0{n}" for n in range(1, after + 1)]


def resume(dtm: DtmFacade, gid: str) -> Any:
    """Let the coordinator's resume cron call the resume endpoint, and wait for the final status."""
    trans = dtm.query(gid)
    # A real DTM may already have resumed it (its first call comes TIMEOUT_TO_FAIL s after prepareWorkflow).
    assert trans is not None and (trans.status == "prepared" or dtm.is_real), trans
    dtm.advance(TIMEOUT_TO_FAIL + 1, gids=[gid])
    return dtm.wait_status(gid, timeout=60 if dtm.is_real else 15)


def result_of(trans: Any) -> Any:
    import base64

    return json.loads(base64.b64decode(trans.result))


@FLAVOURS
@pytest.mark.parametrize("after", [1, 2])
def test_killed_after_step_n_resumes_without_repeating_steps(
    flavour: str, after: int, dtm: DtmFacade, branch_service: BranchService, services: Services
) -> None:
    counting(branch_service)
    gid = local_gid()
    crash(services, branch_service, gid, after)
    services.start()  # a fresh process on the same port: the resume endpoint is back
    trans = resume(dtm, gid)
    assert trans.status == "succeed"
    # Steps 1..N ran once, before the crash; the rest ran once, after it. Nothing was compensated.
    assert step_calls(branch_service) == ["s1:action:01", "s2:action:02", "s3:action:03"]
    # The result holds the recorded bodies of steps 1..N (call numbers 1..N), replayed, not re-fetched.
    assert result_of(trans) == [{"dtm_result": "SUCCESS", "call": n} for n in (1, 2, 3)]


@FLAVOURS
def test_killed_then_failing_step_compensates_in_reverse(
    flavour: str, dtm: DtmFacade, branch_service: BranchService, services: Services
) -> None:
    counting(branch_service)
    branch_service.route("/bank/s3", (409, {"error": "insufficient balance"}))
    gid = local_gid()
    crash(services, branch_service, gid, 2)
    services.start()
    trans = resume(dtm, gid)
    assert trans.status == "failed" and "insufficient balance" in trans.rollback_reason
    # The resumed run registers the compensations of the replayed steps 1 and 2 and runs them in reverse;
    # step 3 failed, so it is not compensated (compensate_error_branch is off).
    assert step_calls(branch_service) == [
        "s1:action:01",
        "s2:action:02",
        "s3:action:03",
        "u2:rollback:02",
        "u1:rollback:01",
    ]
    assert [c.json() for c in branch_service.calls("/bank/u2")] == [INPUT]


@FLAVOURS
def test_transient_error_then_resume_in_the_same_process(
    flavour: str, dtm: DtmFacade, branch_service: BranchService, services: Services
) -> None:
    counting(branch_service, (500, {"error": "temporarily unavailable"}))
    gid = local_gid()
    service = services.start(gid)
    assert "error" in service.read_until("error"), service.lines  # not a failure: the workflow stays prepared
    assert step_calls(branch_service) == ["s1:action:01", "s2:action:02"]
    trans = resume(dtm, gid)  # the coordinator calls the same, still running, process
    assert trans.status == "succeed"
    assert step_calls(branch_service) == ["s1:action:01", "s2:action:02", "s2:action:02", "s3:action:03"]
    assert result_of(trans) == [{"dtm_result": "SUCCESS", "call": n} for n in (1, 2, 3)]


@FLAVOURS
def test_without_sync_the_default_coordinator_keeps_nothing(
    flavour: str, dtm: DtmFacade, branch_service: BranchService, services: Services
) -> None:
    """The point of ``"sync": "1"``: the same crash as above with registerBranch sent as the Go client sends it.

    A coordinator in its default mode (``UpdateBranchSync: 0``, boltdb-like) stores no progress, so the resumed
    workflow calls steps 1 and 2 again. With ``sync`` (every other test here) they are not repeated.
    """
    if dtm.is_real:
        pytest.skip("depends on the real server's UpdateBranchSync and store")
    counting(branch_service)
    gid = local_gid()
    crash(services, branch_service, gid, 2, strip_sync=True)
    services.start(strip_sync=True)
    trans = resume(dtm, gid)
    assert trans.status == "succeed"
    assert step_calls(branch_service) == [
        "s1:action:01",
        "s2:action:02",
        "s1:action:01",
        "s2:action:02",
        "s3:action:03",
    ]
