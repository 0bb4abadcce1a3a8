"""Flask integration for branch handlers.

>>> @app.post("/TransOutTry")
... @branch_handler
... def trans_out_try(info: BranchInfo):
...     body = branch_payload(info)
...     ...                      # raise DtmFailure("insufficient balance") to fail the try
...
A handler returns ``None`` (200 ``{"dtm_result":"SUCCESS"}``), a dict (merged into that body;
``{"dtm_result": "FAILURE"}`` / ``"ONGOING"`` answer as the raised errors) or its own Flask
response, sent unchanged (its body is not inspected); exceptions are mapped by
:func:`dtmcli.branch.error_response`.
:func:`register_error_handlers` maps dtmcli errors raised by undecorated views the same way.

``async def`` views work as Flask runs them (``pip install "flask[async]"``): each request in an
event loop of its own, so an async database must be opened per call (an ``async def`` factory),
not a pool made on another loop. For many concurrent async handlers prefer FastAPI/Starlette or
Django under ASGI.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import flask
from werkzeug.wrappers import Response as WerkzeugResponse

from ..branch import BranchInfo, BranchRequestError, BranchResponse, error_response, load_payload, parse_or_answer
from ..errors import DtmError
from ._common import is_async_callable, run_handler, run_handler_async

__all__ = [
    "branch_handler", "branch_payload", "as_response", "register_error_handlers", "query_prepared_view",
    "workflow_resume_view",
]


def as_response(answer: BranchResponse) -> flask.Response:
    """A Flask JSON response for a mapped answer."""
    return flask.Response(answer.content, status=answer.status, mimetype="application/json")


def branch_handler(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Flask view, sync or ``async def``, as a DTM branch handler; it is called with ``info=BranchInfo``.

    A request whose query is not a valid branch call is answered 400 without calling the view.
    """
    if is_async_callable(func):

        @functools.wraps(func)
        async def async_view(*args: Any, **kwargs: Any) -> WerkzeugResponse:
            info = parse_or_answer(flask.request)
            if isinstance(info, BranchResponse):
                return as_response(info)
            answer, native = await run_handler_async(info, lambda: func(*args, info=info, **kwargs), WerkzeugResponse)
            return native if native is not None else as_response(answer)

        return async_view

    @functools.wraps(func)
    def view(*args: Any, **kwargs: Any) -> WerkzeugResponse:
        info = parse_or_answer(flask.request)
        if isinstance(info, BranchResponse):
            return as_response(info)
        answer, native = run_handler(info, lambda: func(*args, info=info, **kwargs), WerkzeugResponse)
        return native if native is not None else as_response(answer)

    return view


def branch_payload(info: Union[BranchInfo, None] = None) -> Any:
    """The current request's JSON body (``None`` when empty); BranchRequestError (400) when not JSON."""
    return load_payload(flask.request.get_data(cache=True), info)


def register_error_handlers(app: Union[flask.Flask, flask.Blueprint]) -> None:
    """Answer every :class:`~dtmcli.errors.DtmError` escaping a view of ``app`` (or blueprint) as DTM expects."""

    def on_dtm_error(exc: DtmError) -> WerkzeugResponse:
        try:
            info = BranchInfo.from_request(flask.request)
        except BranchRequestError:
            info = None
        return as_response(error_response(exc, info))

    app.register_error_handler(DtmError, on_dtm_error)


def query_prepared_view(
    db: Any, *, table: Union[str, None] = None, dialect: Union[str, None] = None
) -> Callable[[], Any]:
    """A Flask view answering DTM's msg ``query_prepared`` from the SQL barrier table.

    ``app.get("/QueryPrepared")(query_prepared_view(pool.connection))``; ``db`` is anything
    ``@barrier(db=...)`` accepts (see :func:`dtmcli.contrib._query_prepared.query_prepared_answer`).
    Every view has a name of its own (``dtm_query_prepared_<n>``), so one app may serve several (one
    per database or table); pass ``endpoint=`` to ``app.get`` for a name ``url_for`` can rely on.
    With an async database (an ``async def`` factory: Flask runs each async view in a new event
    loop) the view is an ``async def`` view using :mod:`dtmcli.asyncio.barrier`.
    """
    from ._query_prepared import named_view, query_prepared_answer, query_prepared_answer_async, view_is_async

    if view_is_async(db, table):

        async def dtm_query_prepared_async() -> WerkzeugResponse:
            return as_response(await query_prepared_answer_async(flask.request, db, table=table, dialect=dialect))

        return named_view(dtm_query_prepared_async)

    def dtm_query_prepared() -> WerkzeugResponse:
        return as_response(query_prepared_answer(flask.request, db, table=table, dialect=dialect))

    return named_view(dtm_query_prepared)


def workflow_resume_view(token: Optional[str] = None) -> Callable[[], Any]:
    """A Flask view resuming workflows when DTM calls the callback URL given to ``workflow.init_http``.

    ``app.add_url_rule("/api/workflow/resume", view_func=workflow_resume_view(), methods=["GET", "POST"])``.
    Answers 200 (succeeded), 409 (failed, rolled back), 425/500 (DTM calls again; also for a name
    not registered, with a log line). Names of :mod:`dtmcli.asyncio.workflow` run in a loop of their own.
    Only DTM may reach it; ``token`` also requires the callback URL's ``?token=`` (403 otherwise). The
    token is not secret from whoever reads DTM's API (``/query`` shows the callback URL) or the web
    server's access logs: it keeps out callers that reach this service but not DTM's API.
    """
    from ._workflow_resume import check_token, resume_answer

    secret = check_token(token)

    def dtm_workflow_resume() -> WerkzeugResponse:
        return as_response(resume_answer(flask.request, flask.request.get_data(cache=True), token=secret))

    return dtm_workflow_resume
