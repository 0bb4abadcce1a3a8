"""The framework-neutral workflow resume handler behind the Flask, FastAPI/Starlette and Django views.

DTM resumes a prepared workflow by calling its ``query_prepared`` URL with ``gid``,
``trans_type=workflow``, ``branch_id=00``, ``op=<workflow name>`` and the original input as the body
(POST, or GET when the input is empty). The answer (protocol.md §12): 200 when the workflow
succeeded, 409 when it failed (rolled back), 425 or 500 to be called again later — also for a name
no registry knows (with a log line: the service may not have registered it yet), 425 when the gid
is already running in this process, 500 (logged) for a gid prepared for another workflow or input.

The endpoint must be reachable by DTM only: whoever can call it runs registered workflows with any
gid and input. With ``token=`` the views also require the callback URL's ``token`` query parameter
(``init_http(dtm, "http://svc/api/workflow/resume?token=<secret>")``; DTM sends the URL's own query
back unchanged) and answer 403 (logged) without it. dtmcli never logs the token's value, but it is
no secret from whoever can read DTM's API (``/query`` returns the callback URL as ``query_prepared``)
or the web server's access logs (they show the request URL): it keeps out callers that can reach the
service but not DTM's API, and does not replace a network policy. The set of running gids is shared
by both registries, so a name registered in both still runs a gid once at a time in this process.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
from typing import Any, Optional, Union

from .._consts import WORKFLOW
from ..branch import BranchInfo, BranchResponse, error_response, handle, handle_async, parse_or_answer, query_of
from ..errors import BranchRequestError, DtmInvalidInput

__all__ = ["TOKEN_PARAM", "check_token", "resume_answer", "resume_answer_async"]

logger = logging.getLogger("dtmcli")

TOKEN_PARAM = "token"
"""The query parameter of the callback URL the views check when given ``token=``."""


def _token_refused(request: Any, token: Optional[str]) -> Optional[BranchResponse]:
    if token is None:
        return None
    try:
        query = query_of(request)
        getlist = getattr(query, "getlist", None)
        values = list(getlist(TOKEN_PARAM)) if callable(getlist) else [query.get(TOKEN_PARAM)]
    except (BranchRequestError, TypeError):
        values = []
    sent = values[0] if len(values) == 1 and isinstance(values[0], str) else ""
    if sent and hmac.compare_digest(sent.encode(), token.encode()):
        return None
    logger.warning("workflow resume refused: the %r query parameter is missing or wrong", TOKEN_PARAM)
    return BranchResponse(403, {"message": f"workflow resume: bad or missing {TOKEN_PARAM!r}"})


def check_token(token: Optional[str]) -> Optional[str]:
    """``token`` for the resume views: None (no check) or a non-empty str; DtmInvalidInput otherwise."""
    if token is not None and not (isinstance(token, str) and token):
        raise DtmInvalidInput("a workflow resume token must be a non-empty str")
    return token


def _info(request: Any, token: Optional[str] = None) -> Union[BranchInfo, BranchResponse]:
    check_token(token)
    refused = _token_refused(request, token)
    if refused is not None:
        return refused
    info = parse_or_answer(request)
    if isinstance(info, BranchInfo) and info.trans_type != WORKFLOW:
        return error_response(BranchRequestError(f"a workflow resume call has trans_type workflow, not "
                                                 f"{info.trans_type}", gid=info.gid))
    return info


def _async_registry() -> Optional[Any]:
    # Only a process that imported the asyncio workflow module can have registered anything there.
    module = sys.modules.get("dtmcli.asyncio.workflow")
    return module if module is not None else None


def _unknown(info: BranchInfo) -> DtmInvalidInput:
    # Answered 500 and logged (as an error) by handle(): DTM calls again, so a service that has not
    # registered the name yet (a rolling deploy) resumes it later.
    return DtmInvalidInput(
        f"workflow resume: no workflow named {info.op!r} is registered in this process (register it at startup)",
        gid=info.gid,
    )


def resume_answer(request: Any, body: bytes, *, token: Optional[str] = None) -> BranchResponse:
    """Resume the workflow DTM names in ``request`` with input ``body``; the answer DTM expects.

    Names of :mod:`dtmcli.workflow` run here; names only in :mod:`dtmcli.asyncio.workflow` run in an
    event loop of their own. With ``token``, the query must carry it as ``token`` (403 otherwise).
    """
    from .. import workflow

    info = _info(request, token)
    if isinstance(info, BranchResponse):
        return info

    def run() -> None:
        if workflow.is_registered(info.op):
            workflow.execute(info.op, info.gid, body)
            return
        aworkflow = _async_registry()
        if aworkflow is not None and aworkflow.is_registered(info.op):
            asyncio.run(aworkflow.execute(info.op, info.gid, body))
            return
        raise _unknown(info)

    return handle(info, run)


async def resume_answer_async(request: Any, body: bytes, *, token: Optional[str] = None) -> BranchResponse:
    """:func:`resume_answer` on the running loop: names of :mod:`dtmcli.asyncio.workflow` are awaited,
    names only in :mod:`dtmcli.workflow` run in a worker thread."""
    from .. import workflow

    info = _info(request, token)
    if isinstance(info, BranchResponse):
        return info

    async def run() -> None:
        aworkflow = _async_registry()
        if aworkflow is not None and aworkflow.is_registered(info.op):
            await aworkflow.execute(info.op, info.gid, body)
            return
        if workflow.is_registered(info.op):
            await asyncio.to_thread(workflow.execute, info.op, info.gid, body)
            return
        raise _unknown(info)

    return await handle_async(info, run)
