"""Starlette integration for branch handlers (no FastAPI needed; ``dtmcli.contrib.fastapi`` builds on it).

>>> @branch_endpoint
... async def trans_out_try(request: Request, info: BranchInfo):
...     body = await branch_payload(request, info)
...     ...                      # raise DtmFailure("insufficient balance") to fail the try
...
>>> app = Starlette(routes=[Route("/TransOutTry", trans_out_try, methods=["POST"])])

The endpoint is called with the request and ``info=BranchInfo``; ``async def`` endpoints run on
the event loop, plain ``def`` ones in Starlette's thread pool. It returns ``None`` (200
``{"dtm_result":"SUCCESS"}``), a dict (merged into that body; ``{"dtm_result": "FAILURE"}`` /
``"ONGOING"`` answer as the raised errors) or its own Starlette ``Response``, sent unchanged;
exceptions are mapped by :func:`dtmcli.branch.error_response`.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..branch import BranchInfo, BranchResponse, load_payload, parse_or_answer
from ._common import is_async_callable, run_handler, run_handler_async

__all__ = ["as_response", "branch_endpoint", "branch_payload", "query_prepared_endpoint", "workflow_resume_endpoint"]


def as_response(answer: BranchResponse) -> Response:
    """A Starlette JSON response for a mapped answer."""
    return Response(answer.content, status_code=answer.status, media_type="application/json")


async def branch_payload(request: Request, info: Optional[BranchInfo] = None) -> Any:
    """The request's JSON body (``None`` when empty); BranchRequestError (400) when not JSON."""
    return load_payload(await request.body(), info)


def branch_endpoint(func: Callable[..., Any]) -> Callable[[Request], Awaitable[Response]]:
    """Decorate ``func(request, info=BranchInfo)``, sync or ``async def``, as a Starlette branch endpoint.

    A request whose query is not a valid branch call is answered 400 without calling ``func``.
    """

    @functools.wraps(func)
    async def endpoint(request: Request) -> Response:
        info = parse_or_answer(request)
        if isinstance(info, BranchResponse):
            return as_response(info)
        if is_async_callable(func):
            answer, native = await run_handler_async(info, lambda: func(request, info=info), Response)
        else:
            answer, native = await run_in_threadpool(run_handler, info, lambda: func(request, info=info), Response)
        return native if native is not None else as_response(answer)

    return endpoint


def query_prepared_endpoint(
    db: Any, *, table: Optional[str] = None, dialect: Optional[str] = None
) -> Callable[[Request], Any]:
    """A Starlette (or FastAPI) endpoint answering DTM's msg ``query_prepared`` from the SQL barrier table.

    ``Route("/QueryPrepared", query_prepared_endpoint(pool))`` or
    ``app.get("/QueryPrepared")(query_prepared_endpoint(engine))``; ``db`` is anything
    ``@barrier(db=...)`` accepts. With a synchronous database it is a plain function, which
    Starlette and FastAPI run in their thread pool; with an async one (an asyncpg or aiomysql pool,
    psycopg_pool's ``pool.connection``, a SQLAlchemy ``AsyncEngine``, an ``async def`` factory; a
    single async connection or session, which concurrent requests would share, is refused) an
    ``async def`` endpoint awaiting :mod:`dtmcli.asyncio.barrier` on the loop. Errors are answered
    by the endpoint itself (no exception handlers needed).
    """
    from ._query_prepared import named_view, query_prepared_answer, query_prepared_answer_async, view_is_async

    if view_is_async(db, table):

        async def dtm_query_prepared_async(request: Request) -> Response:
            return as_response(await query_prepared_answer_async(request, db, table=table, dialect=dialect))

        return named_view(dtm_query_prepared_async)

    def dtm_query_prepared(request: Request) -> Response:
        return as_response(query_prepared_answer(request, db, table=table, dialect=dialect))

    return named_view(dtm_query_prepared)


def workflow_resume_endpoint(token: Optional[str] = None) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette (or FastAPI) endpoint resuming workflows when DTM calls the workflow callback URL.

    ``app.add_api_route("/api/workflow/resume", workflow_resume_endpoint(), methods=["GET", "POST"])``
    (FastAPI) or ``Route(path, workflow_resume_endpoint(), methods=["GET", "POST"])``. Names of
    :mod:`dtmcli.asyncio.workflow` are awaited on the loop; names only in :mod:`dtmcli.workflow` run
    in a worker thread. Answers 200 / 409 / 425-or-500 (also for an unknown name, with a log line).
    Only DTM may reach it; ``token`` also requires the callback URL's ``?token=`` (403 otherwise). The
    token is not secret from whoever reads DTM's API (``/query`` shows the callback URL) or the web
    server's access logs: it keeps out callers that reach this service but not DTM's API.
    """
    from ._workflow_resume import check_token, resume_answer_async

    secret = check_token(token)

    async def dtm_workflow_resume(request: Request) -> Response:
        return as_response(await resume_answer_async(request, await request.body(), token=secret))

    return dtm_workflow_resume
