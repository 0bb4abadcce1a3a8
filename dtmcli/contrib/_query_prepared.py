"""The framework-neutral msg ``query_prepared`` handler behind the Flask, FastAPI and Django ones."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, TypeVar

from .._barrier.core import validate_table
from .._barrier_decorator import check_async_source, checked_sync_source, is_async_db
from .._consts import MSG
from ..barrier import BranchBarrier
from ..branch import BranchInfo, BranchResponse, handle_query, handle_query_async
from ..errors import BranchRequestError

__all__ = ["is_async_db", "named_view", "query_prepared_answer", "query_prepared_answer_async", "view_is_async"]

ViewT = TypeVar("ViewT", bound=Callable[..., Any])
_VIEW_NUMBERS = itertools.count(1)


def named_view(view: ViewT) -> ViewT:
    """``view`` with a name of its own (``dtm_query_prepared_<n>``).

    Flask names an endpoint after its view function and refuses a second view of the same name, and
    Starlette names routes the same way: one app may serve several query_prepared views (one per
    database or barrier table), so no two views share a name.
    """
    name = f"dtm_query_prepared_{next(_VIEW_NUMBERS)}"
    view.__name__ = view.__qualname__ = name
    return view


def view_is_async(db: Any, table: Optional[str]) -> bool:
    """Whether a query_prepared view on ``db`` must be an ``async def`` one; refuses, when the view is
    made, a bad ``table`` and an async database the view could not use or would share between
    concurrent requests (a single connection or session, see ``@barrier``)."""
    if table is not None:
        validate_table(table)
    if not is_async_db(db):
        return False
    check_async_source(db, "sql")
    return True


def _require_msg(info: BranchInfo) -> None:
    if info.trans_type != MSG:
        raise BranchRequestError(f"query_prepared is a msg call, not {info.trans_type}", gid=info.gid)


def query_prepared_answer(
    request: Any, db: Any, *, table: Optional[str] = None, dialect: Optional[str] = None
) -> BranchResponse:
    """Answer DTM's msg ``query_prepared`` call in ``request`` from the SQL barrier table.

    ``db`` is anything ``@barrier(db=...)`` and :meth:`~dtmcli.msg.Msg.do_and_submit_db` accept (a
    connection factory or pool, a SQLAlchemy Engine/Connection/Session, a DB-API or Django
    connection, ``"django"``). 200 SUCCESS when the local transaction committed, 409 FAILURE when it
    was rolled back (or never ran), 400 for a request that is not a msg query_prepared call,
    425/500 for database trouble.
    """

    source = checked_sync_source(db)  # an application factory handing out an async connection is refused

    def check(info: BranchInfo) -> None:
        _require_msg(info)
        BranchBarrier.for_msg(info.gid, table=table).query_prepared(source, dialect=dialect)

    return handle_query(request, check)


async def query_prepared_answer_async(
    request: Any, db: Any, *, table: Optional[str] = None, dialect: Optional[str] = None
) -> BranchResponse:
    """:func:`query_prepared_answer` on an async database (:mod:`dtmcli.asyncio.barrier`), awaited on the loop.

    ``db`` is anything the async barrier accepts (an asyncpg or aiomysql pool, psycopg_pool's
    ``pool.connection``, a SQLAlchemy ``AsyncEngine`` or ``async_sessionmaker``, an ``async def``
    factory; a single connection or session serves one call at a time).
    """
    from ..asyncio.barrier import BranchBarrier as AsyncBranchBarrier

    async def check(info: BranchInfo) -> None:
        _require_msg(info)
        await AsyncBranchBarrier.for_msg(info.gid, table=table).query_prepared(db, dialect=dialect)

    return await handle_query_async(request, check)
