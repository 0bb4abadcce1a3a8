"""The base every global transaction builder shares: gid, options, the lifecycle, and the
prepare/submit/abort calls."""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any, Callable, ClassVar, Generic, Iterable, Mapping, Optional, TypeVar, overload

from . import _otel
from ._consts import ABORTING, DEFAULT_DTM, FAILED, MAX_REASON_LEN, PREPARED, SUCCEED
from ._flow import Flow, Request, run
from ._options import OPTION_NAMES, TransOptions, did_you_mean
from ._protocol import Response, branch_error, client_branch_query
from ._validate import check_gid, check_http_url
from .client import ClientBase, DtmClient, DtmLike, as_client, local_gid
from .errors import (
    DtmAttributeError,
    DtmConnectError,
    DtmError,
    DtmFailure,
    DtmInProgress,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    DtmTimeout,
    DtmTransportError,
)

__all__ = ["TransCore", "TransBase", "NEW", "PREPARED_STATE", "SUBMITTED", "ABORTED", "NESTED"]

logger = logging.getLogger("dtmcli")

T = TypeVar("T", bound="TransCore")
V = TypeVar("V")

# The lifecycle of a transaction object (TransBase.state).
NEW, PREPARED_STATE, SUBMITTED, ABORTED, NESTED = "new", "prepared", "submitted", "aborted", "nested"


# Options DTM takes from each request rather than from what it stored at prepare (protocol.md §1:
# submit's wait_result only decides whether that request waits for its processing pass).
_PER_REQUEST_OPTIONS = frozenset({"wait_result"})
_MISSING = object()

_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def clip_reason(reason: str) -> str:
    """A rollback reason bounded to what DTM's SQL stores keep, and sendable: a lone surrogate
    (e.g. from an error about a ``surrogateescape``-decoded file name) becomes U+FFFD, as Go
    decodes it, instead of making the abort fail."""
    reason = _SURROGATE_RE.sub("\ufffd", reason)
    return reason if len(reason) <= MAX_REASON_LEN else reason[: MAX_REASON_LEN - 3] + "..."


if sys.version_info >= (3, 14):
    import annotationlib

    def _annotation_names(klass: type) -> Iterable[str]:
        return annotationlib.get_annotations(klass, format=annotationlib.Format.FORWARDREF).keys()

else:

    def _annotation_names(klass: type) -> Iterable[str]:
        annotations: dict[str, Any] = vars(klass).get("__annotations__", {})
        return annotations.keys()


def _declared_names(cls: type) -> frozenset[str]:
    """Attribute names declared as class annotations anywhere in ``cls``'s MRO."""
    return frozenset(name for klass in cls.__mro__ for name in _annotation_names(klass))


class _Option(Generic[V]):
    """A transaction attribute that reads ``trans.options.<name>`` and assigns through
    :meth:`TransBase.set_options` (validated, refused once DTM may hold the transaction)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: Any = None) -> _Option[V]: ...

    @overload
    def __get__(self, obj: TransBase, owner: Any = None) -> V: ...

    def __get__(self, obj: Optional[TransBase], owner: Any = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.options, self.name)

    def __set__(self, obj: TransBase, value: V) -> None:
        obj.set_options(**{self.name: value})


class TransCore:
    """Gid, options, lifecycle and the calls to DTM (as flows) shared by Saga, Msg, TCC and XA,
    sync and async alike. :class:`TransBase` drives the flows with blocking I/O, the classes of
    :mod:`dtmcli.asyncio` await them.

    ``dtm`` is a DTM URL (its shared pooled client is used) or a :class:`DtmClient`.
    ``gid`` defaults to a locally generated shortuuid. Options may be given as keywords
    (``wait_result=True, timeout_to_fail=60, ...``), with the fluent setters, or as attributes
    (``saga.wait_result = True``, the Python spelling of Go's ``saga.WaitResult = true``).

    Lifecycle (:attr:`state`): ``new`` → ``prepared`` → ``submitted`` or ``aborted`` (``nested``
    for a TCC continued inside a branch handler). Each prepare/submit/abort is allowed once, from
    the states its transaction type permits. The state advances when the request is sent and goes
    back only when DTM cannot have received it (an error before sending, or DtmConnectError); a
    failed ``prepare`` always goes back, since DTM's prepare is idempotent. Once a request may have
    reached DTM, the content (gid, steps, options) is frozen: DTM keeps what it received first.

    Assigning an attribute the class does not declare raises
    :class:`~dtmcli.errors.DtmAttributeError` (``saga.wait_reslt = True`` would otherwise be
    silently ignored). A subclass declares its own public attributes as class annotations
    (``tenant: str``); names starting with ``_`` are always free.
    """

    trans_type: ClassVar[str]
    client: ClientBase

    # Where prepare/submit/abort may start; subclasses narrow or widen these.
    _prepare_from: ClassVar[tuple[str, ...]] = (NEW,)
    _submit_from: ClassVar[tuple[str, ...]] = (NEW,)
    _abort_from: ClassVar[tuple[str, ...]] = (PREPARED_STATE,)
    _declared: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._declared = _declared_names(cls)

    def __init__(self, dtm: Any = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        self._gid: str = check_gid(gid) if gid is not None else local_gid()
        self._options = TransOptions.from_mapping(options)
        self._options._bind(self)
        # Reentrant: the sync driver holds it for a whole prepare/submit/abort (serialising them),
        # and the flow takes it again around each state change (all the async driver holds).
        self._lock = threading.RLock()
        self._state = NEW
        self._stored = False  # a prepare/submit/abort of this object may have reached DTM
        self._sent = False  # ... during the operation in progress
        self._busy = ""  # the prepare/submit/abort in flight, if any
        self._concurrent = False
        self.client = self._as_client(dtm)

    @staticmethod
    def _as_client(dtm: Any) -> ClientBase:
        """The client for ``dtm`` (a URL or a client of the driver's kind)."""
        raise NotImplementedError

    def __setattr__(self, name: str, value: Any) -> None:
        if name[0] != "_" and name not in type(self)._declared:
            cls = type(self)
            attr = getattr(cls, name, _MISSING)
            if isinstance(attr, property) and attr.fset is None:
                raise DtmAttributeError(
                    f"{cls.__name__}.{name} is read-only; change it through the transaction's methods",
                    gid=self.__dict__.get("_gid"),
                )
            if attr is _MISSING:
                known = [n for n in dir(cls) if not n.startswith("_")] + list(cls._declared)
                raise DtmAttributeError(
                    f"{cls.__name__} has no attribute {name!r}{did_you_mean(name, known)}; a subclass "
                    "declares its own attributes as class annotations (name: type) or starts them with '_'",
                    gid=self.__dict__.get("_gid"),
                )
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gid={self.gid!r}, dtm={self.client.url!r}, state={self._state!r})"

    @property
    def dtm(self) -> str:
        """The DTM server URL."""
        return self.client.url

    @property
    def state(self) -> str:
        """``new``, ``prepared``, ``submitted``, ``aborted`` or ``nested`` (see the class docstring)."""
        return self._state

    @property
    def gid(self) -> str:
        """The global transaction id; it can change only while nothing was sent to DTM."""
        return self._gid

    @gid.setter
    def gid(self, gid: str) -> None:
        gid = check_gid(gid)
        with self._lock:
            self._check_mutable("change the gid")
            self._gid = gid

    @property
    def options(self) -> TransOptions:
        """The options sent with prepare/submit/abort (assigning one replaces them all)."""
        return self._options

    @options.setter
    def options(self, options: TransOptions) -> None:
        if not isinstance(options, TransOptions):
            raise DtmInvalidInput(f"options must be a TransOptions, not {type(options).__name__}", gid=self.gid)
        new = TransOptions.from_mapping({name: getattr(options, name) for name in OPTION_NAMES})
        with self._lock:
            self._check_mutable("change options", nested_ok=True)
            self._options._bind(None)  # a reference kept to the old object no longer reaches this one
            self._options = new
            new._bind(self)

    @property
    def concurrent(self) -> bool:
        """Run the steps concurrently (saga and msg; sent as ``concurrent``)."""
        return self._concurrent

    @concurrent.setter
    def concurrent(self, concurrent: bool) -> None:
        if not isinstance(concurrent, bool):
            raise DtmInvalidInput(f"concurrent must be a bool, not {concurrent!r}", gid=self.gid)
        with self._lock:
            self._check_mutable("change concurrent")
            self._concurrent = concurrent

    wait_result = _Option[bool]("Make submit (and abort) wait for the first processing pass and report it.")
    timeout_to_fail = _Option[Optional[int]]("Abort (tcc/xa/saga) or query_prepared (msg) after this many seconds.")
    retry_interval = _Option[Optional[int]]("Base interval in seconds of DTM's retries for this transaction.")
    retry_limit = _Option[Optional[int]]("Saga: immediate retries of an action before aborting.")
    request_timeout = _Option[Optional[int]]("Timeout in seconds of DTM's calls to the branches.")
    branch_headers = _Option[Mapping[str, str]]("Extra HTTP headers for every branch call (read-only mapping).")

    # -- lifecycle -------------------------------------------------------------------------

    def _refusal(self, what: str) -> str:
        state, where = self._state, f"{self.trans_type} {self._gid}"
        if state == NESTED:
            return f"cannot {what} on a nested {where}: it belongs to its parent's global transaction"
        if state == SUBMITTED:
            return (
                f"cannot {what}: {where} is already submitted (DTM would run a resubmitted transaction "
                "again); follow it with DtmClient.query(gid)"
            )
        if state == NEW:
            if self._stored:
                return f"cannot {what}: a request of {where} may have reached DTM, which keeps what it got first"
            return f"cannot {what}: {where} is not prepared"
        return f"cannot {what}: {where} is already {state}"

    def _check_mutable(self, what: str, *, nested_ok: bool = False) -> None:
        """Refuse a change of content once DTM may hold the transaction (or it is submitted/aborted).

        Called with ``self._lock`` held, together with the change: ``_run`` holds the lock while it
        sends, so a change racing a prepare/submit either makes it into the request or is refused.
        """
        state = self._state
        if (state == NEW and not self._stored) or (state == NESTED and nested_ok):
            return
        raise DtmInvalidInput(self._refusal(what), gid=self._gid)

    def _run_flow(
        self, op: str, send: Callable[[], Flow[None]], check: Optional[Callable[[], None]] = None
    ) -> Flow[None]:
        """Move the lifecycle for ``op`` (prepare, submit or abort) and run the flow ``send()``.

        One operation at a time: another prepare/submit/abort started while this one is in flight
        (another asyncio task, or a ``do_and_submit`` in another thread) is refused with
        DtmInvalidInput; the sync driver additionally holds the lock, so threads queue. The state
        moves before anything is sent, and goes back only when DTM cannot have received the request
        (or for prepare, which DTM treats idempotently). ``check`` runs under the lock before the
        state moves (it may refuse with ``_check_mutable``).
        """
        allowed, target = {
            "prepare": (self._prepare_from, PREPARED_STATE),
            "submit": (self._submit_from, SUBMITTED),
            "abort": (self._abort_from, ABORTED),
        }[op]
        with self._lock:
            if self._busy:
                raise DtmInvalidInput(
                    f"cannot {op}: a {self._busy} of {self.trans_type} {self._gid} is in progress", gid=self._gid
                )
            if self._state not in allowed:
                raise DtmInvalidInput(self._refusal(op), gid=self._gid)
            if check is not None:
                check()
            before, self._state, self._sent, self._busy = self._state, target, False, op
        try:
            yield from send()
        except BaseException:
            with self._lock:
                if op == "prepare" or not self._sent:
                    self._state = before
            raise
        finally:
            self._busy = ""

    def _post_trans(self, path: str, body: dict[str, Any], *, idempotent: bool = False) -> Flow[None]:
        """POST a prepare/submit/abort body, noting whether DTM may have received it."""
        try:
            yield from self.client._post_flow(path, body, idempotent)
        except (DtmConnectError, DtmInvalidInput):  # this attempt sent nothing (refused; a closed session)
            if idempotent and self.client.retry.retries:  # an earlier attempt may have arrived
                self._sent = self._stored = True
            raise
        except BaseException:
            self._sent = self._stored = True
            raise
        self._sent = self._stored = True

    # -- fluent option setters -------------------------------------------------------------

    def set_options(self: T, **options: Any) -> T:
        """Set several options at once (same names as the keyword arguments).

        Options are fixed once DTM may hold the transaction, except ``wait_result`` between
        ``prepare`` and ``submit``: DTM reads it from each request, never from what it stored.
        """
        with self._lock:
            if not (self._state == PREPARED_STATE and options.keys() <= _PER_REQUEST_OPTIONS):
                self._check_mutable("change options", nested_ok=True)
            self._options._apply(options)
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
        return self.set_options(branch_headers=headers)

    # -- wire ------------------------------------------------------------------------------

    def build_body(self) -> dict[str, Any]:
        """The JSON object sent to DTM for this transaction (same keys as the Go client)."""
        body: dict[str, Any] = {"gid": self._gid, "trans_type": self.trans_type}
        body.update(self._extra_body())
        body.update(self._options.to_wire())
        trace = _otel.trace_headers()
        if trace:  # DTM forwards branch_headers to every branch call: the handlers join this trace
            own = body.get("branch_headers", {})
            if not any(name.lower() in _otel.TRACE_HEADERS for name in own):  # the caller's own context wins
                body["branch_headers"] = {**own, **trace}
        body["concurrent"] = self._concurrent
        body["protocol"] = ""
        return body

    def _extra_body(self) -> dict[str, Any]:
        return {}

    def _check_url(self, url: Any, what: str, *, allow_empty: bool = False) -> str:
        """``url`` checked as a branch URL of this transaction's protocol (HTTP here; the gRPC builders
        of :mod:`dtmcli.grpc` check ``host:port/package.Service/Method``)."""
        return check_http_url(url, what, gid=self._gid, allow_empty=allow_empty)

    def _prepare_flow(self) -> Flow[None]:
        # prepare is idempotent on DTM's side (a prepared gid answers success), so it may be retried.
        return self._post_trans("prepare", self.build_body(), idempotent=True)

    def _abort_flow(self, reason: Optional[str] = None) -> Flow[None]:
        body = self.build_body()
        if reason:
            body["rollback_reason"] = clip_reason(reason)
        return self._post_trans("abort", body)

    def _request_branch(
        self,
        method: str,
        url: str,
        branch_id: str,
        op: str,
        *,
        body: Optional[bytes] = None,
        phase2_url: Optional[str] = None,
    ) -> Flow[Response]:
        """Call a branch the client itself calls (TCC try, XA action, msg query_prepared).

        The query carries ``dtm`` (and ``phase2_url`` for XA), the branch headers are sent, and the
        answer is read as DTM reads it (protocol.md §4, §5); a non-success raises its typed error.
        """
        params = client_branch_query(self.dtm, self.gid, branch_id, self.trans_type, op, phase2_url)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        headers.update(self.options.branch_headers)
        span = _otel.start(f"dtm branch {self.trans_type} {op}", gid=self.gid, trans_type=self.trans_type,
                           branch_id=branch_id, op=op)
        _otel.inject(span, headers)
        try:
            resp: Response = yield Request(method, url, params, body, headers or None)
        except BaseException as exc:
            if isinstance(exc, DtmError):
                exc.gid, exc.branch_id, exc.op = exc.gid or self.gid, exc.branch_id or branch_id, exc.op or op
            _otel.finish(span, exc)
            raise
        err = branch_error(resp, url=url, gid=self.gid, branch_id=branch_id, op=op)
        _otel.finish(span, err)
        if err is not None:
            raise err
        return resp

    def _submit_flow(self, recover: bool = False) -> Flow[None]:
        body = self.build_body()
        try:
            yield from self._post_trans("submit", body)
        except DtmConnectError as exc:  # nothing was sent (DtmConnectTimeout too): only recover may resend
            if not recover:
                raise
            yield from self._recover_submit(exc)
        except (DtmFailure, DtmOngoing, DtmServerError, DtmTimeout) as exc:
            # With wait_result, any answer but 200 only says "not succeeded after one pass": 409/425,
            # and for tcc/xa/msg a branch's 500 or a slow pass passed through (protocol.md §6).
            if not self.options.wait_result or (isinstance(exc, DtmServerError) and exc.status < 500):
                if isinstance(exc, DtmTimeout) and recover:
                    yield from self._recover_submit(exc)
                    return
                raise
            yield from self._settle(exc)
        except DtmTransportError as exc:
            if not recover:
                raise
            yield from self._recover_submit(exc)

    def _settle(self, cause: Exception) -> Flow[None]:
        """Ask /query what really happened after an inconclusive submit answer (never resubmits)."""
        if not self.client.can_query:  # DTM's gRPC API has no query: the answer stands
            raise cause
        trans = yield from self.client._query_flow(self.gid)
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

    def _recover_submit(self, cause: DtmTransportError) -> Flow[None]:
        """After a submit that failed in transport: resend only when it certainly never left.

        A refused connection proves nothing was sent, so one more submit is safe once /query
        agrees. After a timeout or a reset the first request may still arrive, and a second
        submit of a submitted transaction is not idempotent on DTM (protocol.md §2), so the
        outcome is reported as unknown instead.
        """
        if not self.client.can_query:  # DTM's gRPC API has no query: nothing can be checked, nothing is resent
            raise cause
        trans = yield from self.client._query_flow(self.gid)
        if trans is None or trans.status == PREPARED:
            if not isinstance(cause, DtmConnectError):
                raise DtmTransportError(
                    f"submit of {self.trans_type} {self.gid}: outcome unknown ({cause.message}); not resent, "
                    "because the first request may still reach DTM; check with query()",
                    gid=self.gid,
                ) from cause
            logger.warning("dtm submit of %s %s never left; submitting again", self.trans_type, self.gid)
            yield from self._submit_flow(recover=False)
            return
        self._report(trans.status, trans.rollback_reason, cause, waiting=self.options.wait_result)


class TransBase(TransCore):
    """The blocking driver of :class:`TransCore`: each call to DTM runs on a :class:`DtmClient`.

    A prepare/submit/abort holds the transaction's lock until DTM has answered, so calls on one
    object from several threads run one after another.
    """

    client: DtmClient

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    @staticmethod
    def _as_client(dtm: Any) -> ClientBase:
        return as_client(dtm)

    def _run(self, op: str, send: Callable[[], Flow[None]], check: Optional[Callable[[], None]] = None) -> None:
        """Run ``op`` (prepare, submit or abort) with the flow ``send()`` (see :meth:`TransCore._run_flow`)."""
        with self._lock:
            run(self._run_flow(op, send, check), self.client)

    def _drive(self, flow: Flow[V]) -> V:
        """Run a flow on this transaction's client."""
        return run(flow, self.client)
