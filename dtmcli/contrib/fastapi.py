"""FastAPI / Starlette integration for branch handlers.

>>> app = FastAPI()
>>> add_exception_handlers(app)
>>> @app.post("/TransOutTry")
... def trans_out_try(body: dict, info: BranchDep):
...     ...                      # raise DtmFailure("insufficient balance") to fail the try
...     return SUCCESS
...
:func:`branch_info` is a dependency yielding the validated :class:`~dtmcli.branch.BranchInfo`;
the exception handlers answer dtmcli errors as DTM expects (400 / 409 / 425 / 500, 200 for
DtmDuplicated). :func:`as_response` turns a :func:`dtmcli.branch.handle` answer into a response,
for decorators (such as the barrier's) that run the handler themselves.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from fastapi import Depends
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from ..branch import SUCCESS, BranchInfo, BranchRequestError, BranchResponse, error_response, load_payload
from ..errors import DtmError

__all__ = [
    "SUCCESS",
    "BranchDep",
    "PayloadDep",
    "add_exception_handlers",
    "as_response",
    "branch_info",
    "branch_payload",
    "dtm_error_handler",
]


def as_response(answer: BranchResponse) -> Response:
    """A Starlette JSON response for a mapped answer."""
    return Response(answer.content, status_code=answer.status, media_type="application/json")


async def branch_info(request: Request) -> BranchInfo:
    """Dependency: the request's BranchInfo; raises BranchRequestError (answered 400 by the handlers)."""
    return BranchInfo.from_request(request)


async def branch_payload(request: Request) -> Any:
    """Dependency: the raw body as JSON (``None`` when empty); BranchRequestError (400) when not JSON."""
    return load_payload(await request.body())


#: ``info: BranchDep`` in a route's parameters injects the validated BranchInfo.
BranchDep = Annotated[BranchInfo, Depends(branch_info)]
#: ``body: PayloadDep`` injects the raw JSON body (any JSON value, ``None`` when empty).
PayloadDep = Annotated[Any, Depends(branch_payload)]


async def dtm_error_handler(request: Request, exc: Exception) -> Response:
    """Exception handler answering a dtmcli error the way DTM reads it (see ``error_response``)."""
    try:
        info: Optional[BranchInfo] = BranchInfo.from_request(request)
    except BranchRequestError:
        info = None
    return as_response(error_response(exc, info))


def add_exception_handlers(app: Starlette) -> None:
    """Install :func:`dtm_error_handler` for every :class:`~dtmcli.errors.DtmError` on ``app``."""
    app.add_exception_handler(DtmError, dtm_error_handler)
