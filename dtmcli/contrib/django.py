"""Django integration for branch handlers.

>>> @require_POST
... @branch_handler
... def trans_out_try(request, info: BranchInfo):
...     body = branch_payload(request, info)
...     ...                      # raise DtmFailure("insufficient balance") to fail the try
...
The view is exempt from CSRF checks (DTM sends no token). It returns ``None`` (200
``{"dtm_result":"SUCCESS"}``), a dict (merged into that body; ``{"dtm_result": "FAILURE"}`` /
``"ONGOING"`` answer as the raised errors) or its own ``HttpResponse``, sent unchanged (its body is
not inspected); exceptions are mapped by :func:`dtmcli.branch.error_response`.

An ``async def`` view stays async (``async def trans_out_try(request, info)``): Django serves it
on its event loop under ASGI, with the same mapping. Django's database connections are
synchronous, so an async view's barrier needs an async driver (``@barrier(db=asyncpg_pool)``);
``@barrier(db="django")`` on an async view is refused when decorating.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from ..branch import BranchInfo, BranchResponse, load_payload, parse_or_answer
from ._common import is_async_callable, run_handler, run_handler_async

__all__ = ["branch_handler", "branch_payload", "as_response", "query_prepared_view", "workflow_resume_view"]


def _is_async_view(view: Any) -> bool:
    """Django's own test where asgiref has it (it honours ``markcoroutinefunction``), else ours."""
    try:
        from asgiref.sync import iscoroutinefunction
    except ImportError:  # pragma: no cover - asgiref < 3.6 (Django 3.2/4.0)
        return is_async_callable(view)
    return iscoroutinefunction(view) or is_async_callable(view)


def as_response(answer: BranchResponse) -> HttpResponse:
    """A Django JSON response for a mapped answer."""
    return HttpResponse(answer.content, status=answer.status, content_type="application/json")


def branch_handler(view: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Django view, sync or ``async def``, as a DTM branch handler; it is called with ``info=BranchInfo``.

    A request whose query is not a valid branch call is answered 400 without calling the view. The
    wrapper of an async view is itself a coroutine function, so Django awaits it on its loop.
    """
    if _is_async_view(view):

        @functools.wraps(view)
        async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            info = parse_or_answer(request)
            if isinstance(info, BranchResponse):
                return as_response(info)
            answer, native = await run_handler_async(
                info, lambda: view(request, *args, info=info, **kwargs), HttpResponseBase
            )
            return native if native is not None else as_response(answer)

        async_wrapper.csrf_exempt = True  # type: ignore[attr-defined]
        return async_wrapper

    @functools.wraps(view)
    def sync_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        info = parse_or_answer(request)
        if isinstance(info, BranchResponse):
            return as_response(info)
        answer, native = run_handler(info, lambda: view(request, *args, info=info, **kwargs), HttpResponseBase)
        return native if native is not None else as_response(answer)

    sync_wrapper.csrf_exempt = True  # type: ignore[attr-defined]
    return sync_wrapper


def branch_payload(request: HttpRequest, info: Optional[BranchInfo] = None) -> Any:
    """The request's JSON body (``None`` when empty); BranchRequestError (400) when not JSON."""
    return load_payload(request.body, info)


def query_prepared_view(
    db: Any = "django", *, table: Optional[str] = None, dialect: Optional[str] = None
) -> Callable[[HttpRequest], Any]:
    """A Django view answering DTM's msg ``query_prepared`` from the SQL barrier table.

    ``path("QueryPrepared", query_prepared_view())`` uses the ``default`` database; pass
    ``"django:<alias>"`` or anything ``@barrier(db=...)`` accepts. Exempt from CSRF checks. With an
    async database (an asyncpg or aiomysql pool, psycopg_pool's ``pool.connection``, a SQLAlchemy
    ``AsyncEngine``, an ``async def`` factory; a single async connection or session, which
    concurrent requests would share, is refused) the view is an ``async def`` view using
    :mod:`dtmcli.asyncio.barrier`.
    """
    from ._query_prepared import named_view, query_prepared_answer, query_prepared_answer_async, view_is_async

    if view_is_async(db, table):

        async def dtm_query_prepared_async(request: HttpRequest) -> HttpResponse:
            return as_response(await query_prepared_answer_async(request, db, table=table, dialect=dialect))

        dtm_query_prepared_async.csrf_exempt = True  # type: ignore[attr-defined]
        return named_view(dtm_query_prepared_async)

    def dtm_query_prepared(request: HttpRequest) -> HttpResponse:
        return as_response(query_prepared_answer(request, db, table=table, dialect=dialect))

    dtm_query_prepared.csrf_exempt = True  # type: ignore[attr-defined]
    return named_view(dtm_query_prepared)


def workflow_resume_view(token: Optional[str] = None) -> Callable[[HttpRequest], Any]:
    """A Django view resuming workflows when DTM calls the callback URL given to ``workflow.init_http``.

    ``path("api/workflow/resume", workflow_resume_view())``; exempt from CSRF checks (DTM posts
    the workflow input). Answers 200 / 409 / 425-or-500 (also for an unknown name, with a log line).
    Only DTM may reach it; ``token`` also requires the callback URL's ``?token=`` (403 otherwise). The
    token is not secret from whoever reads DTM's API (``/query`` shows the callback URL) or the web
    server's access logs: it keeps out callers that reach this service but not DTM's API.
    """
    from ._workflow_resume import check_token, resume_answer

    secret = check_token(token)

    def dtm_workflow_resume(request: HttpRequest) -> HttpResponse:
        return as_response(resume_answer(request, request.body, token=secret))

    dtm_workflow_resume.csrf_exempt = True  # type: ignore[attr-defined]
    return dtm_workflow_resume
