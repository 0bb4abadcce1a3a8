"""TCC: the client registers each branch, calls its try, then DTM confirms or cancels them all.

>>> with tcc_global_transaction(DTM, timeout_to_fail=30) as tcc:
...     tcc.call_branch({"amount": 30}, f"{busi}/TransOutTry", f"{busi}/TransOutConfirm", f"{busi}/TransOutCancel")
...     tcc.call_branch({"amount": 30}, f"{busi}/TransInTry", f"{busi}/TransInConfirm", f"{busi}/TransInCancel")

Inside a try handler, ``Tcc.from_request(request)`` continues the same global transaction and
registers nested branches ``<branch_id>01``, ``<branch_id>02``, ... (protocol.md §10).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, TypeVar, overload

from ._consts import DEFAULT_DTM, OP_TRY, TCC
from ._flow import Flow
from ._protocol import encode_payload
from ._twophase import BranchReply, GlobalTransaction, TwoPhaseCore, TwoPhaseTrans, global_transaction
from ._validate import check_http_url
from .branch import BranchInfo, BranchRequestError
from .client import DtmLike

__all__ = ["Tcc", "TccCore", "tcc_global_transaction"]

R = TypeVar("R")
TC = TypeVar("TC", bound="TccCore")


class TccCore(TwoPhaseCore):
    """Nesting and the branch call of a TCC, as flows (shared by :class:`Tcc` and the asyncio Tcc)."""

    trans_type = TCC

    @classmethod
    def from_info(cls: type[TC], info: BranchInfo, *, dtm: Optional[Any] = None) -> TC:
        """A nested Tcc for the try call ``info``: same gid, branch ids ``<info.branch_id>01``, ...

        ``dtm`` overrides the DTM address taken from the request's ``dtm`` parameter (use it to
        pin your own client instead of trusting the caller's URL). Raises
        :class:`~dtmcli.branch.BranchRequestError` unless ``info`` is a tcc ``try`` with a ``dtm``,
        and DtmInvalidInput when ``branch_id`` is too long to nest under (§5).
        """
        if info.trans_type != TCC or info.op != OP_TRY:
            raise BranchRequestError(
                f"nested TCC branches can only be called from a tcc try handler, not a {info.trans_type} {info.op}",
                gid=info.gid,
                branch_id=info.branch_id,
                op=info.op,
            )
        tcc = cls(dtm if dtm is not None else info.require_dtm(), info.gid)
        tcc._nest_under(info.branch_id)
        return tcc

    @classmethod
    def from_query(cls: type[TC], query: Mapping[str, Any], *, dtm: Optional[Any] = None) -> TC:
        """A nested Tcc from a try call's query mapping (see :meth:`from_info`)."""
        return cls.from_info(BranchInfo.from_query(query), dtm=dtm)

    @classmethod
    def from_request(cls: type[TC], request: Any, *, dtm: Optional[Any] = None) -> TC:
        """A nested Tcc from a Flask, FastAPI/Starlette or Django request (see :meth:`from_info`)."""
        return cls.from_info(BranchInfo.from_request(request), dtm=dtm)

    def _call_branch_flow(self, payload: Any, try_url: str, confirm_url: str, cancel_url: str) -> Flow[BranchReply]:
        """Check (nothing sent on bad input), take the next branch id, register the branch, POST its try."""
        self._check_can_call()
        check_http_url(try_url, "tcc try URL", gid=self.gid)
        check_http_url(confirm_url, "tcc confirm URL", gid=self.gid, allow_empty=True)
        check_http_url(cancel_url, "tcc cancel URL", gid=self.gid, allow_empty=True)
        data = encode_payload(payload, gid=self.gid)
        branch_id = self._ids.next()
        flow = self._register_and_try(data, branch_id, try_url, confirm_url, cancel_url)
        return self._recording(flow, branch_id, OP_TRY)

    def _register_and_try(
        self, data: str, branch_id: str, try_url: str, confirm_url: str, cancel_url: str
    ) -> Flow[BranchReply]:
        yield from self.client._post_flow(
            "registerBranch",
            {
                "gid": self.gid,
                "trans_type": TCC,
                "branch_id": branch_id,
                "data": data,
                "confirm": confirm_url,
                "cancel": cancel_url,
            },
        )
        return (yield from self._branch_flow(try_url, data, branch_id, OP_TRY))


class Tcc(TccCore, TwoPhaseTrans):
    """A TCC global transaction (or, from :meth:`from_request`, a nested part of one).

    Usually driven by :func:`tcc_global_transaction`; by hand it is ``prepare()``, any number of
    :meth:`call_branch`, then ``submit()`` or ``abort(reason)``. ``Tcc.from_request(request)``
    (also ``from_query``, ``from_info``) continues the global transaction inside a try handler.
    """

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    def call_branch(self, payload: Any, try_url: str, confirm_url: str, cancel_url: str) -> BranchReply:
        """Register a branch (confirm/cancel URLs and payload), then POST its try; return the try's answer.

        ``payload`` is any JSON value (or raw ``str``/``bytes``); DTM sends the same body to confirm
        and cancel. An empty confirm or cancel URL means "nothing to do". The try answer is read as
        DTM reads it: FAILURE raises DtmFailure, ONGOING DtmOngoing, other errors DtmServerError.
        Any error after the branch was registered makes the global transaction abort.
        Thread-safe: branches may be called concurrently.
        """
        return self._drive(self._call_branch_flow(payload, try_url, confirm_url, cancel_url))


@overload
def tcc_global_transaction(
    dtm: DtmLike = ..., gid: Optional[str] = ..., callback: None = ..., **options: Any
) -> GlobalTransaction[Tcc]: ...


@overload
def tcc_global_transaction(dtm: DtmLike, gid: Optional[str], callback: Callable[[Tcc], R], **options: Any) -> R: ...


@overload
def tcc_global_transaction(
    dtm: DtmLike = ..., gid: Optional[str] = ..., *, callback: Callable[[Tcc], R], **options: Any
) -> R: ...


def tcc_global_transaction(
    dtm: DtmLike = DEFAULT_DTM,
    gid: Optional[str] = None,
    callback: Optional[Callable[[Tcc], Any]] = None,
    **options: Any,
) -> Any:
    """Run a TCC global transaction: ``prepare`` (with the options), the body, then ``submit``.

    Any exception from the body ``abort``\\ s the transaction with ``rollback_reason`` set to the
    error text, then propagates unchanged. Three shapes:

    * ``with tcc_global_transaction(dtm, gid, **options) as tcc: ...``
    * ``@tcc_global_transaction(dtm, **options)`` on ``def f(tcc, ...)``: a new transaction per call;
    * ``tcc_global_transaction(dtm, gid, callback, **options)`` runs ``callback(tcc)`` now and
      returns its result (Go's ``TccGlobalTransaction``).

    ``gid=None`` means a new local gid for each transaction. Options and gid are checked here,
    before anything is sent. The body must be a plain function: an ``async def`` raises
    DtmInvalidInput here (its body would only run after the submit). Called from a coroutine,
    this blocking form stalls the event loop (a branch served by that loop hangs until the
    timeout): use :func:`dtmcli.asyncio.tcc_global_transaction` there.
    """
    return global_transaction(GlobalTransaction, Tcc, "tcc_global_transaction", dtm, gid, callback, options)
