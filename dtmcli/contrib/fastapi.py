"""FastAPI / Starlette integration for branch handlers.

>>> router = APIRouter(route_class=DtmRoute)
>>> @router.post("/TransOutTry")
... def trans_out_try(info: BranchDep, body: PayloadDep):
...     ...                      # raise DtmFailure("insufficient balance") to fail the try
...
>>> app.include_router(router)   # after the routes are declared

Every route of a ``DtmRoute`` router is a branch handler answered as DTM expects, with no other
setup: a malformed branch query is 400 before the route runs; :class:`~dtmcli.errors.DtmFailure`
is 409 (where FAILURE is allowed), :class:`~dtmcli.errors.DtmOngoing` 425, DtmDuplicated 200, a
returned ``{"dtm_result": "FAILURE" | "ONGOING"}`` (a dict or a pydantic model) the same as the
raised error, and other dtmcli errors 500 (see :func:`dtmcli.branch.error_response`). A returned
value goes through :func:`dtmcli.branch.success_response` as in every integration, so one whose
JSON holds the words FAILURE/ONGOING is a 500. A returned Starlette ``Response`` is sent unchanged,
as Flask and Django send a view's own response: its body is not inspected (return a dict or raise
DtmFailure to fail). FastAPI's ``HTTPException`` with status 409 or 425 is answered as DtmFailure or
DtmOngoing (FAILURE only where the op allows it, else 500), as in every integration (Flask's
``abort(409)`` too). Other exceptions (other HTTPExceptions, validation errors, bugs) go to the
application's handlers as usual. Routes may be ``async def`` (run on the event loop, with the
same mapping) or plain ``def`` (run in the thread pool); :func:`dtmcli.branch.current_branch_info`
is the call of the request being served in either, and ``@barrier(db_arg="conn")`` runs an async
route's work in the barrier on a dependency-injected async connection.

:func:`branch_info` (``BranchDep``) injects the validated :class:`~dtmcli.branch.BranchInfo`;
``PayloadDep`` the JSON body. :func:`add_exception_handlers` maps dtmcli errors for routes that
are not ``DtmRoute`` routes; :func:`as_response` turns a :func:`dtmcli.branch.handle` answer
into a response.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Annotated, Any, Callable, Coroutine, Optional

from fastapi import Depends
from fastapi.routing import APIRoute
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import _otel
from ..branch import (
    SUCCESS,
    BranchInfo,
    BranchRequestError,
    error_response,
    handling,
    load_payload,
    success_response,
)
from ..errors import DtmError
from .starlette import as_response, query_prepared_endpoint, workflow_resume_endpoint

__all__ = [
    "SUCCESS",
    "BranchDep",
    "DtmRoute",
    "PayloadDep",
    "add_exception_handlers",
    "as_response",
    "branch_info",
    "branch_payload",
    "dtm_error_handler",
    "query_prepared_endpoint",
    "workflow_resume_endpoint",
]

# Where DtmRoute keeps the BranchInfo it parsed, so that the dependency does not parse it again.
_SCOPE_KEY = "dtmcli.branch_info"


async def branch_info(request: Request) -> BranchInfo:
    """Dependency: the request's BranchInfo; raises BranchRequestError (answered 400)."""
    info = request.scope.get(_SCOPE_KEY)
    return info if isinstance(info, BranchInfo) else BranchInfo.from_request(request)


async def branch_payload(request: Request) -> Any:
    """Dependency: the raw body as JSON (``None`` when empty); BranchRequestError (400) when not JSON."""
    return load_payload(await request.body())


#: ``info: BranchDep`` in a route's parameters injects the validated BranchInfo.
BranchDep = Annotated[BranchInfo, Depends(branch_info)]
#: ``body: PayloadDep`` injects the raw JSON body (any JSON value, ``None`` when empty).
PayloadDep = Annotated[Any, Depends(branch_payload)]


_NATIVE = "_dtmcli_native"  # marks a Response the route returned itself (sent unchanged)


def _result(value: Any) -> Any:
    """The route's return value as FastAPI should send it: ``None`` is SUCCESS; a Response is marked
    as the route's own, so the handler sends it unchanged (as Flask and Django send native ones)."""
    if isinstance(value, Response):
        setattr(value, _NATIVE, True)
        return value
    return dict(SUCCESS) if value is None else value


def _checked(response: Response, info: BranchInfo) -> Optional[Response]:
    """The answer to send instead of ``response`` when its body breaks the rules, else ``None``.

    The check reads the body FastAPI serialised (after ``response_model``), not the route's raw
    value: what DTM reads is what counts. It gets the rules of every integration
    (:func:`~dtmcli.branch.success_response`): ``dtm_result`` FAILURE/ONGOING is mapped for this
    op, and a body holding the words FAILURE/ONGOING is a 500.
    """
    body = getattr(response, "body", None)
    if getattr(response, _NATIVE, False) or response.status_code != 200 or not isinstance(body, bytes) or not body:
        return None
    try:
        value: Any = json.loads(body)
    except (ValueError, RecursionError):
        value = body.decode("utf-8", "replace")
    answer = success_response(value, info)
    return None if answer.status == 200 else as_response(answer)


def _checking_result(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` (same signature, sync or async) whose return value goes through :func:`_result`."""
    if inspect.iscoroutinefunction(endpoint) or inspect.iscoroutinefunction(type(endpoint).__call__):

        @functools.wraps(endpoint)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            return _result(await endpoint(*args, **kwargs))

        return run_async

    @functools.wraps(endpoint)
    def run(*args: Any, **kwargs: Any) -> Any:
        return _result(endpoint(*args, **kwargs))

    return run


class DtmRoute(APIRoute):
    """An APIRoute answering as DTM expects: use ``APIRouter(route_class=DtmRoute)``.

    The query is validated before the route runs (400 when it is not a branch call); dtmcli errors
    and ``HTTPException`` 409/425 raised by the route or its dependencies are mapped by
    :func:`dtmcli.branch.error_response` for this call's op, and a returned value by
    :func:`dtmcli.branch.success_response` (a returned ``Response`` is sent unchanged).
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, _checking_result(endpoint), **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's ASGI handler, wrapped with the branch-call parsing and error mapping."""
        route_handler = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                info = BranchInfo.from_request(request)
            except BranchRequestError as exc:
                return as_response(error_response(exc))
            request.scope[_SCOPE_KEY] = info
            with handling(info):  # current_branch_info() for the route, its dependencies and thread-pool calls
                try:
                    response = await route_handler(request)
                    response = _checked(response, info) or response
                except DtmError as exc:
                    response = as_response(error_response(exc, info))
                except HTTPException as exc:
                    if exc.status_code not in (409, 425):
                        raise
                    response = as_response(error_response(exc, info))  # FAILURE/ONGOING, for this op
                _otel.outcome(response.status_code)
                return response

        return handler


async def dtm_error_handler(request: Request, exc: Exception) -> Response:
    """Exception handler answering a dtmcli error the way DTM reads it (see ``error_response``)."""
    try:
        info: Optional[BranchInfo] = BranchInfo.from_request(request)
    except BranchRequestError:
        info = None
    return as_response(error_response(exc, info))


def add_exception_handlers(app: Starlette) -> None:
    """Install :func:`dtm_error_handler` for every :class:`~dtmcli.errors.DtmError` on ``app``.

    Not needed for ``DtmRoute`` routes; for plain routes it maps raised errors (a returned
    ``dtm_result`` FAILURE is only honoured by ``DtmRoute``).
    """
    app.add_exception_handler(DtmError, dtm_error_handler)
