"""The base every global transaction builder shares: gid, options, and the prepare/submit/abort calls."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Mapping, Optional, TypeVar

from ._consts import ABORTING, DEFAULT_DTM, FAILED, MAX_REASON_LEN, PREPARED, SUCCEED
from ._options import TransOptions
from ._protocol import Response, branch_error, client_branch_query
from ._validate import check_gid
from .client import DtmClient, DtmLike, as_client, local_gid
from .errors import (
    DtmConnectError,
    DtmError,
    DtmFailure,
    DtmInProgress,
    DtmOngoing,
    DtmServerError,
    DtmTimeout,
    DtmTransportError,
)

__all__ = ["TransBase"]

logger = logging.getLogger("dtmcli")

T = TypeVar("T", bound="TransBase")


def clip_reason(reason: str) -> str:
    """A rollback reason bounded to what DTM's SQL stores keep."""
    return reason if len(reason) <= MAX_REASON_LEN else reason[: MAX_REASON_LEN - 3] + "..."


class TransBase:
    """Gid, options and the calls to DTM shared by Saga, Msg, TCC and XA.

    ``dtm`` is a DTM URL (its shared pooled client is used) or a :class:`DtmClient`.
    ``gid`` defaults to a locally generated shortuuid. Options may be given as keywords
    (``wait_result=True, timeout_to_fail=60, ...``) or with the fluent setters.
    """

    trans_type: ClassVar[str]

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        self.client: DtmClient = as_client(dtm)
        self.gid: str = check_gid(gid) if gid is not None else local_gid()
        self.options = TransOptions.from_mapping(options)
        self.concurrent = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gid={self.gid!r}, dtm={self.client.url!r})"

    @property
    def dtm(self) -> str:
        """The DTM server URL."""
        return self.client.url

    # -- fluent option setters -------------------------------------------------------------

    def set_options(self: T, **options: Any) -> T:
        """Set several options at once (same names as the keyword arguments)."""
        self.options.update(**options)
        return self

    def set_wait_result(self: T, wait_result: bool = True) -> T:
        """Make submit/abort wait for the first processing pass and report its result."""
        return self.set_options(wait_result=wait_result)

    def set_timeout_to_fail(self: T, seconds: int) -> T:
        """Abort (tcc/xa/saga) or query_prepared (msg) after this many seconds."""
        return self.set_options(timeout_to_fail=seconds)

    def set_retry_interval(self: T, seconds: int) -> T:
        """Base interval of DTM's retries for this transaction."""
        return self.set_options(retry_interval=seconds)

    def set_retry_limit(self: T, limit: int) -> T:
        """Saga: immediate retries of an action before aborting."""
        return self.set_options(retry_limit=limit)

    def set_request_timeout(self: T, seconds: int) -> T:
        """Timeout of DTM's calls to the branches of this transaction."""
        return self.set_options(request_timeout=seconds)

    def set_branch_headers(self: T, headers: Mapping[str, str]) -> T:
        """Extra HTTP headers DTM adds to every branch call."""
        return self.set_options(branch_headers=dict(headers))

    # -- wire ------------------------------------------------------------------------------

    def build_body(self) -> dict[str, Any]:
        """The JSON object sent to DTM for this transaction (same keys as the Go client)."""
        body: dict[str, Any] = {"gid": self.gid, "trans_type": self.trans_type}
        body.update(self._extra_body())
        body.update(self.options.to_wire())
        body["concurrent"] = self.concurrent
        body["protocol"] = ""
        return body

    def _extra_body(self) -> dict[str, Any]:
        return {}

    def _call_prepare(self) -> None:
        # prepare is idempotent on DTM's side (a prepared gid answers success), so it may be retried.
        self.client.post("prepare", self.build_body(), idempotent=True)

    def _call_abort(self, reason: Optional[str] = None) -> None:
        body = self.build_body()
        if reason:
            body["rollback_reason"] = clip_reason(reason)
        self.client.post("abort", body)

    def _request_branch(
        self,
        method: str,
        url: str,
        branch_id: str,
        op: str,
        *,
        body: Optional[bytes] = None,
        phase2_url: Optional[str] = None,
    ) -> Response:
        """Call a branch the client itself calls (TCC try, XA action, msg query_prepared).

        The query carries ``dtm`` (and ``phase2_url`` for XA), the branch headers are sent, and the
        answer is read as DTM reads it (protocol.md §4, §5); a non-success raises its typed error.
        """
        params = client_branch_query(self.dtm, self.gid, branch_id, self.trans_type, op, phase2_url)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        headers.update(self.options.branch_headers)
        try:
            resp = self.client.transport.request(method, url, params=params, body=body, headers=headers or None)
        except DtmError as exc:
            exc.gid, exc.branch_id, exc.op = exc.gid or self.gid, exc.branch_id or branch_id, exc.op or op
            raise
        err = branch_error(resp, url=url, gid=self.gid, branch_id=branch_id, op=op)
        if err is not None:
            raise err
        return resp

    def _call_submit(self, *, recover: bool = False) -> None:
        body = self.build_body()
        try:
            self.client.post("submit", body)
        except (DtmFailure, DtmOngoing, DtmServerError, DtmTimeout) as exc:
            # With wait_result, any answer but 200 only says "not succeeded after one pass": 409/425,
            # and for tcc/xa/msg a branch's 500 or a slow pass passed through (protocol.md §6).
            if not self.options.wait_result or (isinstance(exc, DtmServerError) and exc.status < 500):
                if isinstance(exc, DtmTimeout) and recover:
                    self._recover_submit(exc)
                    return
                raise
            self._settle(exc)
        except DtmTransportError as exc:
            if not recover:
                raise
            self._recover_submit(exc)

    def _settle(self, cause: Exception) -> None:
        """Ask /query what really happened after an inconclusive submit answer (never resubmits)."""
        trans = self.client.query(self.gid)
        if trans is None or trans.status == PREPARED:
            raise cause  # DTM has not (yet) taken the submit: nothing to settle
        self._report(trans.status, trans.rollback_reason, cause, waiting=True)

    def _report(self, status: str, reason: str, cause: Exception, *, waiting: bool) -> None:
        """Turn a queried status into the caller's outcome: return, DtmFailure or DtmInProgress."""
        if status in (FAILED, ABORTING):
            # aborting only ever ends in failed: the outcome is decided.
            raise DtmFailure(reason or str(cause), gid=self.gid) from cause
        if waiting and status != SUCCEED:
            raise DtmInProgress(
                f"{self.trans_type} {self.gid} is still {status}; DTM keeps processing it, do not submit again",
                status=status,
                gid=self.gid,
            ) from cause

    def _recover_submit(self, cause: DtmTransportError) -> None:
        """After a submit that failed in transport: resend only when it certainly never left.

        A refused connection proves nothing was sent, so one more submit is safe once /query
        agrees. After a timeout or a reset the first request may still arrive, and a second
        submit of a submitted transaction is not idempotent on DTM (protocol.md §2), so the
        outcome is reported as unknown instead.
        """
        trans = self.client.query(self.gid)
        if trans is None or trans.status == PREPARED:
            if not isinstance(cause, DtmConnectError):
                raise DtmTransportError(
                    f"submit of {self.trans_type} {self.gid}: outcome unknown ({cause.message}); not resent, "
                    "because the first request may still reach DTM; check with query()",
                    gid=self.gid,
                ) from cause
            logger.warning("dtm submit of %s %s never left; submitting again", self.trans_type, self.gid)
            self._call_submit(recover=False)
            return
        self._report(trans.status, trans.rollback_reason, cause, waiting=self.options.wait_result)
