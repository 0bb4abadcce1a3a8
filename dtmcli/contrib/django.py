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
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from ..branch import BranchInfo, BranchRequestError, BranchResponse, error_response, load_payload
from ._common import run_handler

__all__ = ["branch_handler", "branch_payload", "as_response", "query_prepared_view"]


def as_response(answer: BranchResponse) -> HttpResponse:
    """A Django JSON response for a mapped answer."""
    return HttpResponse(answer.content, status=answer.status, content_type="application/json")


def branch_handler(view: Callable[..., Any]) -> Callable[..., HttpResponseBase]:
    """Decorate a Django view as a DTM branch handler; it is called with ``info=BranchInfo``.

    A request whose query is not a valid branch call is answered 400 without calling the view.
    """

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            info = BranchInfo.from_request(request)
        except BranchRequestError as exc:
            return as_response(error_response(exc))
        answer, native = run_handler(info, lambda: view(request, *args, info=info, **kwargs), HttpResponseBase)
        return native if native is not None else as_response(answer)

    wrapper.csrf_exempt = True  # type: ignore[attr-defined]
    return wrapper


def branch_payload(request: HttpRequest, info: Optional[BranchInfo] = None) -> Any:
    """The request's JSON body (``None`` when empty); BranchRequestError (400) when not JSON."""
    return load_payload(request.body, info)


def query_prepared_view(
    db: Any = "django", *, table: Optional[str] = None, dialect: Optional[str] = None
) -> Callable[[HttpRequest], HttpResponse]:
    """A Django view answering DTM's msg ``query_prepared`` from the SQL barrier table.

    ``path("QueryPrepared", query_prepared_view())`` uses the ``default`` database; pass
    ``"django:<alias>"`` or anything ``@barrier(db=...)`` accepts. Exempt from CSRF checks.
    """
    from ._query_prepared import named_view, query_prepared_answer

    def dtm_query_prepared(request: HttpRequest) -> HttpResponse:
        return as_response(query_prepared_answer(request, db, table=table, dialect=dialect))

    dtm_query_prepared.csrf_exempt = True  # type: ignore[attr-defined]
    return named_view(dtm_query_prepared)
