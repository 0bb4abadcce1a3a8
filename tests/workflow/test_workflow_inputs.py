"""Bad input to the workflow API: a clear typed error, before anything is sent."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import pytest
from wf_fakes import DTM, FakeDtm

import dtmcli.asyncio.workflow as aworkflow
from dtmcli import DtmClient, DtmFailure, DtmInvalidInput, workflow
from dtmcli._workflow import Registry
from dtmcli.client import as_client

NAME = "wf_inputs"


def noop(wf: workflow.Workflow, data: bytes) -> None:
    wf.new_branch().do(lambda bb: b"")


@pytest.fixture
def dtm() -> Iterator[FakeDtm]:
    fake = FakeDtm()
    workflow.init_http(DtmClient(DTM, transport=fake), "http://svc.test/resume")  # type: ignore[arg-type]
    workflow.register(NAME, noop)
    yield fake
    workflow.unregister(NAME)


def test_input_too_large_for_custom_data_is_refused_before_sending(dtm: FakeDtm) -> None:
    # {"data":"<base64>","name":"wf_inputs"}: 30 characters around the base64 of the input.
    limit = (1024 - len('{"data":"","name":"wf_inputs"}')) // 4 * 3
    workflow.execute(NAME, "G1", b"x" * limit)
    assert len(dtm.calls) > 0
    dtm.calls.clear()
    with pytest.raises(DtmInvalidInput, match=r"custom_data is 10[0-9]{2} characters"):
        workflow.execute(NAME, "G2", b"x" * (limit + 3))
    assert dtm.calls == []


@pytest.mark.parametrize("data", ["text", None, 42, ["b"]])
def test_non_bytes_input_is_refused(dtm: FakeDtm, data: Any) -> None:
    with pytest.raises(DtmInvalidInput, match="must be bytes"):
        workflow.execute(NAME, "G", data)
    assert dtm.calls == []


def test_bytearray_and_memoryview_inputs_are_bytes(dtm: FakeDtm) -> None:
    workflow.execute(NAME, "G", bytearray(b"a"))
    workflow.execute(NAME, "G", memoryview(b"a"))
    assert [c[1] for c in dtm.calls].count(f"{DTM}/prepareWorkflow") == 2


@pytest.mark.parametrize("gid", ["", "a b", "x" * 129, "g;1", 7])
def test_bad_gid_is_refused(dtm: FakeDtm, gid: Any) -> None:
    with pytest.raises(DtmInvalidInput):
        workflow.execute(NAME, gid, b"in")
    assert dtm.calls == []


def test_unknown_name_is_refused(dtm: FakeDtm) -> None:
    with pytest.raises(DtmInvalidInput, match="no workflow named 'nobody'"):
        workflow.execute("nobody", "G", b"in")
    with pytest.raises(DtmInvalidInput, match="op and gid"):
        workflow.execute_by_qs({"gid": "G"}, b"in")
    assert dtm.calls == []


def test_duplicate_registration_is_refused(dtm: FakeDtm) -> None:
    with pytest.raises(DtmInvalidInput, match="already registered"):
        workflow.register(NAME, noop)
    with pytest.raises(DtmInvalidInput, match="already registered"):
        workflow.register(NAME)(noop)
    assert workflow.is_registered(NAME)


@pytest.mark.parametrize("name", ["", "has space", "x" * 46, "commit", "rollback", "action", "business", 3, "naïve"])
def test_bad_names_are_refused(name: Any) -> None:
    with pytest.raises(DtmInvalidInput):
        workflow.register(name, noop)


def test_bad_options_are_refused() -> None:
    with pytest.raises(DtmInvalidInput, match="unknown workflow option"):
        workflow.register("wf_opts", noop, wait_result=True)
    with pytest.raises(DtmInvalidInput, match="compensate_error_branch must be a bool"):
        workflow.register("wf_opts", noop, compensate_error_branch="yes")
    with pytest.raises(DtmInvalidInput):
        workflow.register("wf_opts", noop, timeout_to_fail=-1)
    with pytest.raises(DtmInvalidInput, match="not callable"):
        workflow.register("wf_opts", "noop")  # type: ignore[call-overload]
    assert not workflow.is_registered("wf_opts")


def test_async_function_is_refused_by_the_sync_registry() -> None:
    async def later(wf: Any, data: bytes) -> None:
        pass

    with pytest.raises(DtmInvalidInput, match=r"dtmcli\.asyncio\.workflow"):
        workflow.register("wf_async", later)  # type: ignore[call-overload]
    assert not workflow.is_registered("wf_async")


def test_execute_before_init_http_is_refused() -> None:
    fresh = Registry(as_client, blocking=True)
    fresh.register("x", noop)
    with pytest.raises(DtmInvalidInput, match="init_http"):
        fresh.lookup("x")


def test_bad_callback_url_is_refused() -> None:
    with pytest.raises(DtmInvalidInput):
        workflow.init_http(DTM, "not a url")


def test_phase2_failure_is_a_clear_error(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        def confirm(bb: Any) -> None:
            raise DtmFailure("no")

        wf.new_branch().on_commit(confirm).do(lambda bb: b"")

    workflow.register("wf_p2", fn)
    try:
        with pytest.raises(workflow.WorkflowPhase2Error, match="commit callback of branch 01 raised FAILURE"):
            workflow.execute("wf_p2", "G", b"in")
    finally:
        workflow.unregister("wf_p2")
    assert f"{DTM}/submit" not in [c[1] for c in dtm.calls]


def test_bad_results_are_refused_before_phase2(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> Any:
        wf.new_branch().on_commit(lambda bb: None).do(lambda bb: b"")
        return b"r" * 800 if data == b"big" else "text"

    workflow.register("wf_res", fn)
    try:
        with pytest.raises(DtmInvalidInput, match="must return bytes or None"):
            workflow.execute("wf_res", "G", b"str")
        with pytest.raises(DtmInvalidInput, match="result column"):
            workflow.execute("wf_res", "G", b"big")
    finally:
        workflow.unregister("wf_res")
    ops = [b["op"] for b in dtm.bodies("registerBranch")]
    assert "commit" not in ops and f"{DTM}/submit" not in [c[1] for c in dtm.calls]


def test_step_result_must_be_utf8_text(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().do(lambda bb: b"\xff\xfe")

    workflow.register("wf_bin", fn)
    try:
        with pytest.raises(DtmInvalidInput, match="UTF-8"):
            workflow.execute("wf_bin", "G", b"in")
    finally:
        workflow.unregister("wf_bin")
    assert dtm.bodies("registerBranch") == []


def test_request_arguments_are_checked(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch()
        for kwargs in ({"json": {}, "data": b""}, {"data": 3}):
            with pytest.raises(DtmInvalidInput):
                wf.request("POST", "http://busi.test/a", **kwargs)
        with pytest.raises(DtmInvalidInput):
            wf.request("POST", "ftp://busi.test/a")
        with pytest.raises(DtmInvalidInput):
            wf.request("PO ST", "http://busi.test/a")

    workflow.register("wf_req", fn)
    try:
        workflow.execute("wf_req", "G", b"in")
    finally:
        workflow.unregister("wf_req")
    assert [c[1] for c in dtm.calls] == [f"{DTM}/prepareWorkflow", f"{DTM}/submit"]


def test_async_module_checks_the_same() -> None:
    with pytest.raises(DtmInvalidInput, match="no workflow named"):
        asyncio.run(aworkflow.execute("nobody", "G", b"in"))

    async def fn(wf: Any, data: bytes) -> None:
        pass

    aworkflow.register("wf_a_in", fn)
    try:
        with pytest.raises(DtmInvalidInput, match="already registered"):
            aworkflow.register("wf_a_in", fn)
        aworkflow.init_http(DTM, "http://svc.test/resume")
        with pytest.raises(DtmInvalidInput, match="must be bytes"):
            asyncio.run(aworkflow.execute("wf_a_in", "G", "text"))  # type: ignore[arg-type]
    finally:
        aworkflow.unregister("wf_a_in")
