"""Issue 9.2: option attributes (``saga.wait_result = True``) are real, validated properties, and an
attribute a transaction does not have (a typo, a Go spelling) is an error instead of a dead attribute."""

from __future__ import annotations

import copy
import gc
import json
import pickle
import weakref
from typing import Any, Callable, Optional

import pytest

from dtmcli import (
    DtmAttributeError,
    DtmClient,
    DtmFailure,
    DtmInvalidInput,
    Msg,
    Saga,
    Tcc,
    TransOptions,
    Xa,
    local_gid,
)
from dtmcli._trans import TransBase
from dtmcli.testing import Answer, BranchService, DtmFacade

NOWHERE = "http://127.0.0.1:9/api/dtmsvr"  # nothing is sent in these tests; port 9 would refuse
BUSI = "http://127.0.0.1:9/busi"


def saga() -> Saga:
    return Saga(NOWHERE, "G1").add(f"{BUSI}/a", f"{BUSI}/c", {"n": 1})


def msg() -> Msg:
    return Msg(NOWHERE, "G1").add(f"{BUSI}/a", {"n": 1})


BUILDERS: list[Callable[[], TransBase]] = [saga, msg, lambda: Tcc(NOWHERE, "G1"), lambda: Xa(NOWHERE, "G1")]
IDS = ["saga", "msg", "tcc", "xa"]

OPTION_VALUES: list[tuple[str, Any, Any]] = [
    ("wait_result", True, True),
    ("timeout_to_fail", 60, 60),
    ("retry_interval", 7, 7),
    ("retry_limit", 2, 2),
    ("request_timeout", 5, 5),
    ("branch_headers", {"X-Tenant": "t1"}, {"X-Tenant": "t1"}),
]


@pytest.mark.parametrize("build", BUILDERS, ids=IDS)
@pytest.mark.parametrize(("name", "value", "wire"), OPTION_VALUES, ids=[o[0] for o in OPTION_VALUES])
def test_option_attribute_reaches_the_wire(build: Callable[[], TransBase], name: str, value: Any, wire: Any) -> None:
    trans = build()
    assert name not in trans.build_body()
    setattr(trans, name, value)
    assert getattr(trans, name) == value and getattr(trans.options, name) == value
    assert trans.build_body()[name] == wire


@pytest.mark.parametrize("build", BUILDERS, ids=IDS)
def test_option_attribute_body_equals_keyword_body(build: Callable[[], TransBase]) -> None:
    by_attr, by_kw = build(), build()
    for name, value, _ in OPTION_VALUES:
        setattr(by_attr, name, value)
    by_kw.set_options(**{name: value for name, value, _ in OPTION_VALUES})
    assert by_attr.build_body() == by_kw.build_body()


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("wait_result", 1),
        ("wait_result", "true"),
        ("timeout_to_fail", "30"),
        ("timeout_to_fail", -1),
        ("timeout_to_fail", True),
        ("retry_interval", 1.5),
        ("retry_limit", 2**63),
        ("request_timeout", [3]),
        ("branch_headers", {"X-A": 1}),
        ("branch_headers", "X-A: 1"),
        ("branch_headers", {"Content-Length": "0"}),
    ],
)
def test_option_attribute_is_validated_and_left_unchanged(name: str, bad: Any) -> None:
    trans = saga()
    before = trans.build_body()
    with pytest.raises(DtmInvalidInput):
        setattr(trans, name, bad)
    assert trans.build_body() == before


@pytest.mark.parametrize("build", BUILDERS, ids=IDS)
@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("wait_reslt", "wait_result"),
        ("WaitResult", "wait_result"),
        ("TimeoutToFail", "timeout_to_fail"),
        ("retry_intervals", "retry_interval"),
        ("RetryLimit", "retry_limit"),
        ("RequestTimeout", "request_timeout"),
        ("BranchHeaders", "branch_headers"),
        ("Concurrent", "concurrent"),
        ("Gid", "gid"),
        ("timeout", None),
    ],
)
def test_unknown_attribute_is_an_error(build: Callable[[], TransBase], name: str, hint: Optional[str]) -> None:
    trans = build()
    before = trans.build_body()
    with pytest.raises(DtmAttributeError) as info:
        setattr(trans, name, True)
    assert isinstance(info.value, AttributeError) and isinstance(info.value, DtmInvalidInput)
    assert name in str(info.value)
    if hint:
        assert f"did you mean {hint!r}" in str(info.value)
    assert name not in vars(trans) and trans.build_body() == before


def test_options_object_refuses_unknown_and_invalid_names() -> None:
    trans = saga()
    with pytest.raises(DtmAttributeError, match="did you mean 'wait_result'"):
        trans.options.wait_reslt = True  # type: ignore[attr-defined]
    with pytest.raises(DtmInvalidInput):
        trans.options.retry_limit = "3"  # type: ignore[assignment]
    with pytest.raises(DtmInvalidInput, match=r"RetryLimit.*did you mean 'retry_limit'"):
        Saga(NOWHERE, RetryLimit=3)
    with pytest.raises(DtmInvalidInput, match="unknown transaction option"):
        trans.set_options(wait_reslt=True)
    assert trans.options == TransOptions()


def test_set_options_is_all_or_nothing() -> None:
    trans = saga()
    with pytest.raises(DtmInvalidInput):
        trans.set_options(retry_limit=3, timeout_to_fail="x")
    assert trans.retry_limit is None


def test_branch_headers_cannot_be_changed_behind_validation() -> None:
    trans = saga()
    trans.branch_headers = {"X-A": "1"}
    with pytest.raises(TypeError):
        trans.branch_headers["Host"] = "evil"  # type: ignore[index]
    with pytest.raises(TypeError):
        trans.options.branch_headers["Transfer-Encoding"] = "chunked"  # type: ignore[index]
    assert trans.build_body()["branch_headers"] == {"X-A": "1"}


def test_options_copy_and_pickle_keep_the_values() -> None:
    opts = TransOptions(wait_result=True, retry_limit=2, branch_headers={"X-A": "1"})
    assert copy.deepcopy(opts) == opts and pickle.loads(pickle.dumps(opts)) == opts
    assert copy.copy(opts) == opts


def test_replacing_the_options_object_is_validated() -> None:
    trans = saga()
    trans.options = TransOptions(retry_interval=4)
    assert trans.build_body()["retry_interval"] == 4
    with pytest.raises(DtmInvalidInput):
        trans.options = {"retry_interval": 4}  # type: ignore[assignment]


@pytest.mark.parametrize("build", [saga, msg], ids=["saga", "msg"])
def test_concurrent_attribute(build: Callable[[], TransBase]) -> None:
    trans = build()
    trans.concurrent = True
    body = trans.build_body()
    assert body["concurrent"] is True
    if isinstance(trans, Saga):
        assert body["custom_data"] == '{"concurrent":true,"orders":{}}'
    with pytest.raises(DtmInvalidInput):
        trans.concurrent = "yes"  # type: ignore[assignment]
    assert trans.concurrent is True


def test_gid_attribute_is_validated() -> None:
    trans = saga()
    trans.gid = "G2"
    assert trans.build_body()["gid"] == "G2"
    with pytest.raises(DtmInvalidInput):
        trans.gid = "G 2"
    assert trans.gid == "G2"


def test_msg_delay_and_query_prepared_attributes() -> None:
    m = msg()
    m.delay = 2
    m.query_prepared = f"{BUSI}/qp"
    body = m.build_body()
    assert body["custom_data"] == '{"delay":2}' and body["query_prepared"] == f"{BUSI}/qp"
    with pytest.raises(DtmInvalidInput):
        m.delay = -1
    with pytest.raises(DtmInvalidInput):
        m.query_prepared = "not a url"
    assert m.delay == 2 and m.query_prepared == f"{BUSI}/qp"


class TenantSaga(Saga):
    """A user subclass: public attributes are declared as annotations, private ones are free."""

    tenant: str

    def __init__(self, dtm: str, tenant: str) -> None:
        super().__init__(dtm, local_gid())
        self.tenant = tenant
        self._cache: dict[str, str] = {}

    def add_for_tenant(self, url: str) -> TenantSaga:
        self.add(url, "", {"tenant": self.tenant})
        return self


def test_subclass_declares_its_attributes() -> None:
    s = TenantSaga(NOWHERE, "t1").add_for_tenant(f"{BUSI}/a")
    s.tenant = "t2"
    s.wait_result = True
    assert s.tenant == "t2" and s.build_body()["wait_result"] is True
    with pytest.raises(DtmAttributeError, match="did you mean 'tenant'"):
        s.tenantt = "t3"  # type: ignore[attr-defined]

    class Undeclared(Saga):
        def __init__(self) -> None:
            super().__init__(NOWHERE)
            self.region = "eu"

    with pytest.raises(DtmAttributeError, match="class annotations"):
        Undeclared()


def test_methods_may_still_be_replaced_on_an_instance() -> None:
    """Instance-level replacement of a method (as mocks and monkeypatch do) stays possible."""
    trans = saga()

    def fake_body() -> dict[str, Any]:
        return {"fake": True}

    trans.build_body = fake_body  # type: ignore[method-assign]
    assert trans.build_body() == {"fake": True}


def test_wait_result_attribute_takes_effect_end_to_end(dtm: DtmFacade, branch_service: BranchService) -> None:
    """The Go idiom ``saga.WaitResult = true``, spelt the Python way, makes submit report the failure."""
    action = branch_service.route("/attr/a", Answer(409, {"dtm_result": "FAILURE"}))
    gid = local_gid()
    s = Saga(DtmClient(dtm.url), gid).add(action, branch_service.url("/attr/c"), {"n": 1})
    s.wait_result = True
    s.retry_interval = 3
    with pytest.raises(DtmFailure):
        s.submit()
    assert dtm.wait_status(gid).status == "failed"


def test_default_options_equal_a_fresh_instance() -> None:
    """from_mapping starts from precomputed defaults; they must stay those of the dataclass."""
    assert TransOptions.from_mapping({}) == TransOptions()
    assert TransOptions.from_mapping({"retry_limit": 1}) == TransOptions(retry_limit=1)


# -- the options object of a transaction changes only through it --------------------------------


def test_options_object_of_a_transaction_goes_through_its_checks() -> None:
    trans = saga()
    trans.options.retry_limit = 3  # free while new, and the same as trans.retry_limit = 3
    trans.options.update(timeout_to_fail=60)
    assert trans.retry_limit == 3 and trans.build_body()["timeout_to_fail"] == 60
    trans._state = "submitted"  # what submit() leaves (nothing is sent in this module)
    for change in (lambda: setattr(trans.options, "retry_limit", 4), lambda: trans.options.update(retry_limit=4)):
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            change()
    with pytest.raises(DtmAttributeError, match="did you mean 'retry_limit'"):
        trans.options.retry_limt = 4  # type: ignore[attr-defined]
    assert trans.options.retry_limit == 3


def test_detached_and_copied_options_are_free() -> None:
    trans = saga()
    old = trans.options
    trans.options = TransOptions(retry_interval=4)
    trans._state = "submitted"
    old.retry_limit = 9  # no longer the transaction's: changes nothing there, and is not refused
    free = copy.copy(trans.options)
    free.retry_interval = 5
    assert trans.retry_limit is None and trans.retry_interval == 4 and free.retry_interval == 5
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        trans.options.retry_interval = 5


def test_options_object_does_not_keep_its_transaction_alive() -> None:
    trans = saga()
    ref, opts = weakref.ref(trans), trans.options
    gc.disable()
    try:
        del trans
        assert ref() is None  # freed at once: the options refer back weakly, no reference cycle
    finally:
        gc.enable()
    opts.retry_limit = 2  # a plain options object again
    assert opts.retry_limit == 2


@pytest.mark.parametrize("build", BUILDERS[1:], ids=IDS[1:])
def test_wait_result_is_sent_with_the_submit_after_prepare(build: Callable[[], TransBase]) -> None:
    """protocol.md §1: DTM stores the options of the prepare, but takes wait_result from each submit
    request; so wait_result alone may still change between prepare and submit."""
    with BranchService(default=200) as fake_dtm:
        trans = build()
        trans.client = DtmClient(f"{fake_dtm.base_url}/api/dtmsvr", timeout=5)
        if isinstance(trans, Msg):
            trans.prepare(f"{BUSI}/qp")
        else:
            trans.prepare()  # type: ignore[attr-defined]
        trans.set_wait_result()
        with pytest.raises(DtmInvalidInput, match="already prepared"):
            trans.retry_interval = 3
        trans.submit()  # type: ignore[attr-defined]
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            trans.wait_result = False
        prepare, submit = (json.loads(fake_dtm.calls(f"/api/dtmsvr/{op}")[0].body) for op in ("prepare", "submit"))
        trans.client.close()
    assert "wait_result" not in prepare and submit["wait_result"] is True
