"""XA, global side: prepare, call each branch's action, then DTM commits or rolls them all back.

>>> with xa_global_transaction(DTM) as xa:
...     xa.call_branch({"amount": 30}, f"{busi}/TransOutXa")
...     xa.call_branch({"amount": 30}, f"{busi}/TransInXa")

Each branch handler runs its local XA transaction and registers itself (protocol.md §9);
:func:`register_xa_branch` is that registration call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar, overload

from ._consts import DEFAULT_DTM, OP_ACTION, XA
from ._flow import Flow, run
from ._protocol import encode_payload
from ._twophase import BranchReply, GlobalTransaction, TwoPhaseCore, TwoPhaseTrans, global_transaction
from ._validate import check_http_url
from .branch import BranchInfo, BranchRequestError
from .client import ClientBase, DtmLike, as_client

__all__ = ["Xa", "XaCore", "xa_global_transaction", "register_xa_branch", "register_xa_branch_flow", "xa_registration"]

R = TypeVar("R")


class XaCore(TwoPhaseCore):
    """The branch call of an XA global transaction, as a flow (shared by :class:`Xa` and the asyncio Xa)."""

    trans_type = XA

    def _call_branch_flow(self, payload: Any, url: str) -> Flow[BranchReply]:
        """Check (nothing sent on bad input), take the next branch id, POST the action."""
        self._check_can_call()
        check_http_url(url, "xa branch URL", gid=self.gid)
        body = encode_payload(payload, gid=self.gid)
        branch_id = self._ids.next()
        flow = self._branch_flow(url, body, branch_id, OP_ACTION, phase2_url=url)
        return self._recording(flow, branch_id, OP_ACTION)


class Xa(XaCore, TwoPhaseTrans):
    """An XA global transaction. Usually driven by :func:`xa_global_transaction`; by hand it is
    ``prepare()``, any number of :meth:`call_branch`, then ``submit()`` or ``abort(reason)``."""

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    def call_branch(self, payload: Any, url: str) -> BranchReply:
        """POST the branch's action (``op=action``, ``phase2_url=url``) and return its answer.

        DTM later calls the same ``url`` with ``op=commit`` or ``op=rollback``. The answer is read
        as DTM reads it (FAILURE → DtmFailure, ONGOING → DtmOngoing, other errors DtmServerError);
        any error makes the global transaction abort. Thread-safe.
        """
        return self._drive(self._call_branch_flow(payload, url))


def xa_registration(info: BranchInfo) -> dict[str, str]:
    """The registerBranch body of the XA branch of ``info`` (an ``op=action`` call); checked, nothing sent."""
    if info.trans_type != XA or info.op != OP_ACTION:
        raise BranchRequestError(
            f"only an xa action registers an xa branch, not a {info.trans_type} {info.op}",
            gid=info.gid,
            branch_id=info.branch_id,
            op=info.op,
        )
    url = info.require_phase2_url()
    return {"gid": info.gid, "trans_type": XA, "branch_id": info.branch_id, "url": url}


def register_xa_branch_flow(client: ClientBase, body: dict[str, str]) -> Flow[None]:
    """The registerBranch call of an XA branch (``body`` from :func:`xa_registration`)."""
    yield from client._post_flow("registerBranch", body)


def register_xa_branch(info: BranchInfo, *, dtm: Optional[DtmLike] = None) -> None:
    """Branch side: register the XA branch of an ``op=action`` call with DTM.

    Sends ``{gid, trans_type:"xa", branch_id, url: phase2_url}``; call it inside the local XA
    transaction, before ``XA PREPARE`` (protocol.md §9). ``dtm`` overrides the request's ``dtm``.
    A 409 means the global transaction is no longer ``prepared``: roll the local work back.
    """
    body = xa_registration(info)
    client = as_client(dtm if dtm is not None else info.require_dtm())
    run(register_xa_branch_flow(client, body), client)


@overload
def xa_global_transaction(
    dtm: DtmLike = ..., gid: Optional[str] = ..., callback: None = ..., **options: Any
) -> GlobalTransaction[Xa]: ...


@overload
def xa_global_transaction(dtm: DtmLike, gid: Optional[str], callback: Callable[[Xa], R], **options: Any) -> R: ...


@overload
def xa_global_transaction(
    dtm: DtmLike = ..., gid: Optional[str] = ..., *, callback: Callable[[Xa], R], **options: Any
) -> R: ...


def xa_global_transaction(
    dtm: DtmLike = DEFAULT_DTM,
    gid: Optional[str] = None,
    callback: Optional[Callable[[Xa], Any]] = None,
    **options: Any,
) -> Any:
    """Run an XA global transaction: ``prepare`` (with the options), the body, then ``submit``.

    Any exception from the body ``abort``\\ s it with ``rollback_reason`` set (the Go client sends
    none; the reason helps operators) and propagates unchanged. The same three shapes as
    :func:`~dtmcli.tcc.tcc_global_transaction`: ``with``, decorator, or ``callback``; an
    ``async def`` body raises DtmInvalidInput.
    """
    return global_transaction(GlobalTransaction, Xa, "xa_global_transaction", dtm, gid, callback, options)
