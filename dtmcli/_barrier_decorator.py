"""``@barrier(db)``: run a branch handler's database work inside the barrier transaction.

This is the framework glue of the barrier; the public name is :func:`dtmcli.barrier.barrier`.
It imports :mod:`dtmcli.branch` and the storage package, and neither imports it back. A plain
``def`` handler runs in the blocking barrier (:mod:`dtmcli.barrier`), an ``async def`` handler in
the asyncio one (:mod:`dtmcli.asyncio.barrier`); the glue around both is shared here.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import logging
import sys
import typing
from typing import Any, Callable, Optional, Union

from ._barrier.branch_barrier import BranchBarrier
from ._barrier.core import validate_table
from ._barrier.sql_conn import _is_factory as is_factory
from ._barrier.sql_conn import is_django_source
from ._consts import RESULT_SUCCESS
from ._dbkind import ASYNC, SYNC, async_backend_supports, kind_of
from .branch import (
    BranchInfo,
    BranchResponse,
    handle,
    handle_async,
    is_async_callable,
    parse_or_answer,
    raise_for_result,
)
from .errors import DtmInvalidInput

__all__ = ["SyncAsyncMismatch", "barrier", "check_async_source", "checked_sync_source", "db_kind", "is_async_db"]

logger = logging.getLogger("dtmcli")

_BACKENDS = ("sql", "mongo")


class SyncAsyncMismatch(DtmInvalidInput, TypeError):
    """A synchronous database given to an ``async def`` handler, or an async one to a plain ``def`` handler.

    Refused before any statement runs: blocking I/O on the event loop, or coroutines that are never
    awaited, would otherwise go unnoticed.
    """


def db_kind(db: Any) -> Optional[str]:
    """``"async"``, ``"sync"``, or ``None`` when it cannot be told, for a database source ``db``.

    ``db`` is a connection, pool, engine, session (maker) or client, a bound method of one (a
    pool's ``acquire``), a driver's connect function, an ``async def`` factory (also behind
    ``functools.partial``), or ``"django"``/``"django:<alias>"`` (synchronous). A plain function of
    the application's own (a factory) cannot be told before it is called: ``None``.
    """
    if isinstance(db, str):
        return SYNC
    while isinstance(db, functools.partial):
        db = db.func
    if inspect.iscoroutinefunction(db):
        return ASYNC
    return kind_of(*_origin(db))


def _origin(db: Any) -> tuple[str, str]:
    """The module and class (or function) name a database source comes from (methods: their object's)."""
    while isinstance(db, functools.partial):
        db = db.func
    while inspect.ismethod(db):
        db = db.__self__
    if isinstance(db, type) or inspect.isfunction(db) or inspect.isbuiltin(db):
        return getattr(db, "__module__", None) or "", getattr(db, "__name__", "")
    return type(db).__module__, type(db).__name__


def is_async_db(db: Any) -> bool:
    """Whether ``db`` is known to be an async database source (see :func:`db_kind`)."""
    return db_kind(db) == ASYNC


def _describe(db: Any) -> str:
    if isinstance(db, str):
        return repr(db)
    name = getattr(db, "__qualname__", None) or type(db).__qualname__
    module = getattr(db, "__module__", None) or type(db).__module__
    return f"{module}.{name}"


def _mismatch(db: Any, async_handler: bool, kind: Optional[str]) -> SyncAsyncMismatch:
    what = _describe(db)
    if not async_handler:
        return SyncAsyncMismatch(
            f"db {what} is an async database but the handler is a plain def: make the handler async def "
            "(it then runs in dtmcli.asyncio.barrier), give an application factory of async connections as an "
            "async def (so it is recognised), or pass a synchronous connection source"
        )
    if kind is None:
        return SyncAsyncMismatch(
            f"an async def handler needs a database known to be async, and {what} cannot be told: pass an "
            "async driver's pool, connection or connect function (asyncpg, aiomysql, psycopg AsyncConnection, "
            "SQLAlchemy AsyncEngine/AsyncSession/async_sessionmaker), an async def factory "
            "(functools.partial(asyncpg.connect, dsn)), or db_arg= naming the handler's connection argument"
        )
    return SyncAsyncMismatch(
        f"db {what} is synchronous and would block the event loop of this async def handler: use an async "
        "driver (asyncpg, aiomysql, psycopg AsyncConnection, SQLAlchemy async) or make the handler a plain def"
    )


def check_async_source(db: Any, backend: str) -> None:
    """Refuse, when decorating an ``async def`` handler, a database the asyncio barrier cannot use.

    A driver it has no adapter for (aiopg, asyncmy, aiosqlite, motor) would answer 500 on every
    call. A single SQL connection or session (``db`` is fixed when decorating) would be shared by
    every concurrent request of the event loop, and one connection runs one transaction at a time.
    """
    module, name = _origin(db)
    if not async_backend_supports(module, name, backend):
        hint = ("an asyncpg, aiomysql, psycopg (async) or SQLAlchemy async database" if backend == "sql"
                else "pymongo's AsyncMongoClient")
        raise DtmInvalidInput(f"the asyncio {backend} barrier cannot use {_describe(db)}: use {hint}")
    if backend == "sql":
        from .asyncio._barrier_sql import SINGLE, source_shape

        if source_shape(db) == SINGLE:
            raise DtmInvalidInput(
                f"db {_describe(db)} is a single connection or session, which every concurrent request of this "
                "async def handler would share (one connection runs one transaction at a time): pass a pool, an "
                "AsyncEngine, an async_sessionmaker or a factory (e.g. psycopg_pool's pool.connection), or "
                "db_arg= naming the handler's per-request connection argument"
            )


def _check_at_call(db: Any, async_handler: bool) -> None:
    """Refuse a database object met at call time (``db_arg``, a factory's result) of the other kind."""
    kind = db_kind(db)
    if async_handler and kind == SYNC:
        raise _mismatch(db, True, kind)
    if not async_handler and (kind == ASYNC or inspect.isawaitable(db)):
        if isinstance(db, collections.abc.Coroutine):  # aiomysql's connect() too
            db.close()  # never awaited: close it so no warning hides the real error
        raise _mismatch(db, False, ASYNC)


def checked_sync_source(db: Any) -> Any:
    """``db`` for the blocking barrier; a factory of unknown kind has its result checked when called."""
    if db_kind(db) is not None or not is_factory(db):
        return db

    def factory() -> Any:
        conn = db()
        _check_at_call(conn, False)
        return conn

    return factory


def _plain_info(args: tuple[Any, ...]) -> Union[BranchInfo, BranchResponse]:
    """The plain form: the call is the first argument (a request, a query mapping or a BranchInfo)."""
    if not args:
        raise DtmInvalidInput("@barrier handler called without info= or a request/query argument")
    return args[0] if isinstance(args[0], BranchInfo) else parse_or_answer(args[0])


def _grpc_call_info(args: tuple[Any, ...]) -> Optional[BranchInfo]:
    """The call's BranchInfo when the handler is a gRPC servicer method (``args`` hold its context), else None."""
    if "grpc" not in sys.modules:  # no gRPC context can exist: the optional extra is not even imported
        return None
    from .grpc.server import call_info

    return call_info(args)


def _checked_value(value: Any) -> Any:
    # A returned FAILURE/ONGOING is raised here, inside the barrier, so the barrier rolls the work back
    # exactly as for a raised DtmFailure (a later compensation is then a null one).
    raise_for_result(value)
    return value


def _answer(result: Any) -> Any:
    """A skipped call (duplicate, suspended, null compensation) answers SUCCESS."""
    return {"dtm_result": RESULT_SUCCESS} if result is None else result


def barrier(
    db: Any = None,
    *,
    backend: str = "sql",
    table: Optional[str] = None,
    dialect: Optional[str] = None,
    tx_arg: str = "tx",
    db_arg: Optional[str] = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a branch handler so it runs once per branch op, inside the barrier transaction.

    ``db`` is where the connection comes from: a connection factory or pool's ``connect``
    (opened per call, closed after), a SQLAlchemy Engine, ``"django"`` / ``"django:<alias>"``, or
    — with ``backend="mongo"`` — a MongoClient. A single connection or Session works too, but every
    call shares it and it serves one call at a time (a concurrent call from another thread is
    answered 500): prefer a source giving each call its own. Or name the handler's own argument
    holding it with ``db_arg`` (a FastAPI dependency; the handler still receives it). The handler
    gets the transaction object as the keyword ``tx_arg`` (the connection, Session or Mongo
    session). A skipped call (duplicate, suspended, null compensation) returns
    ``{"dtm_result":"SUCCESS"}`` without running the handler.

    The barrier owns its transaction, as the answer goes to DTM when the handler returns: a
    SQLAlchemy Session or Connection (from ``db_arg``) that already has a transaction open is
    refused (500, nothing runs) rather than joined through a savepoint that its owner might never
    commit. Give the handler a session nothing else used in that request.

    An ``async def`` handler runs in :mod:`dtmcli.asyncio.barrier` and needs an async database
    source giving each call its own connection: an asyncpg/aiomysql pool or its ``acquire``, a
    SQLAlchemy ``AsyncEngine`` or ``async_sessionmaker``, psycopg_pool's ``pool.connection``, an
    ``async def`` factory, or pymongo's ``AsyncMongoClient`` for ``backend="mongo"`` (not motor). A
    single async connection or session as ``db`` is refused when decorating (concurrent requests
    would share it); pass a per-request one through ``db_arg``. A database of the other kind than
    the handler raises :class:`SyncAsyncMismatch` (a DtmInvalidInput and a TypeError) when
    decorating, or for ``db_arg`` and application factories at the first call (answered 500),
    before any statement runs. A database the asyncio barrier has no adapter for (aiopg, asyncmy,
    aiosqlite, motor) and a bad ``table`` are refused (DtmInvalidInput) when decorating too.

    Put it under a framework integration, which passes ``info=BranchInfo``; Flask (Django is the
    same with ``dtmcli.contrib.django``)::

        @app.post("/TransOutCompensate")
        @branch_handler
        @barrier(db=pool.connection)
        def compensate(info: BranchInfo, tx):
            ...

    FastAPI: a route of an ``APIRouter(route_class=DtmRoute)`` with ``info: BranchDep``; the
    transaction argument is hidden from FastAPI's dependency injection::

        router = APIRouter(route_class=DtmRoute)

        @router.post("/TransOutCompensate")
        @barrier(db=engine)
        def compensate(info: BranchDep, body: PayloadDep, tx=None):
            ...

        @router.post("/TransInCompensate")
        @barrier(db_arg="conn")
        async def compensate_in(info: BranchDep, conn: AsyncConnDep, tx=None):
            await tx.execute(...)

    On a gRPC servicer method ``method(self, request, context, tx)`` (``async def`` under grpc.aio),
    served with :class:`dtmcli.grpc.server.DtmServerInterceptor` (or its asyncio twin; without it the
    call is refused before any statement runs), the call is the context's ``dtm-*`` metadata, the
    handler gets no ``info`` (read :func:`~dtmcli.branch.current_branch_info`), and a skipped call is
    answered with an empty reply.

    Called without ``info`` (the plain form), the first argument is the request, its query mapping
    or a BranchInfo, and the result is the mapped :class:`~dtmcli.branch.BranchResponse` (awaited
    for an ``async def`` handler).
    """
    if backend not in _BACKENDS:
        raise DtmInvalidInput(f"barrier backend must be one of {', '.join(_BACKENDS)}, not {backend!r}")
    if (db is None) == (db_arg is None):
        raise DtmInvalidInput("@barrier needs exactly one of db= (the database) or db_arg= (the handler's argument)")
    if db_arg is not None and (not isinstance(db_arg, str) or not db_arg.isidentifier() or db_arg == tx_arg):
        raise DtmInvalidInput(f"db_arg must name a handler argument other than tx_arg, not {db_arg!r}")
    # Strings are resolved per call by the SQL barrier's one resolver; refuse a bad one now, not per request.
    if isinstance(db, str) and (backend == "mongo" or not (db == "django" or db.startswith("django:"))):
        raise DtmInvalidInput(f"db {db!r}: pass a connection, factory, engine, 'django' or 'django:<alias>'")
    if table is not None:
        validate_table(table)  # now, not as a 500 on every call

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        async_handler = is_async_callable(func)
        if db is not None:
            kind = db_kind(db)
            if (kind != ASYNC) if async_handler else (kind == ASYNC):
                raise _mismatch(db, async_handler, kind)
            if async_handler:
                check_async_source(db, backend)
        wrapper = _async_wrapper(func) if async_handler else _sync_wrapper(func)
        functools.update_wrapper(wrapper, func)
        # FastAPI reads the signature to build dependencies: hide the injected transaction argument.
        # String annotations (``from __future__ import annotations``) are resolved here, in the
        # handler's module: FastAPI would otherwise look the names up in this module.
        sig = inspect.signature(func)
        try:
            hints = typing.get_type_hints(func, include_extras=True)
        except Exception as exc:  # an unresolvable annotation: FastAPI reports it itself
            logger.debug("@barrier: cannot resolve the annotations of %s: %s", func.__qualname__, exc)
            hints = {}
        params = [
            p.replace(annotation=hints.get(name, p.annotation))
            for name, p in sig.parameters.items() if name != tx_arg
        ]
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper

    def source(kwargs: dict[str, Any], async_handler: bool) -> Any:
        """The database of this call: ``db``, or the handler's ``db_arg`` argument (checked)."""
        if db_arg is None:
            return db
        if db_arg not in kwargs:
            raise DtmInvalidInput(f"@barrier(db_arg={db_arg!r}): the handler was called without {db_arg}=")
        value = kwargs[db_arg]
        _check_at_call(value, async_handler)
        return value

    def _sync_wrapper(func: Callable[..., Any]) -> Callable[..., Any]:
        sync_db = checked_sync_source(db) if db is not None else None

        def run(info: BranchInfo, args: tuple[Any, ...], kwargs: dict[str, Any], with_info: bool = True) -> Any:
            bb = BranchBarrier.from_info(info, table=table)
            conn_source = sync_db if db_arg is None else source(kwargs, False)
            given = {"info": info} if with_info else {}  # a gRPC servicer method takes (self, request, context)

            def busi(tx: Any) -> Any:
                return _checked_value(func(*args, **given, **{**kwargs, tx_arg: tx}))

            if backend == "mongo":
                return _answer(bb.mongo_call(conn_source, busi))
            # The answer goes to DTM as soon as the call returns: the barrier must own a transaction that
            # is committed by then, not a savepoint of one the caller may never commit. Django is the
            # exception: its response leaves only after the request's atomic blocks (ATOMIC_REQUESTS) end.
            joins = is_django_source(conn_source)
            return _answer(bb.call_with_db(conn_source, busi, dialect=dialect, join_transaction=joins))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            info = kwargs.pop("info", None)
            if info is not None:
                return run(info, args, kwargs)
            grpc_info = _grpc_call_info(args)
            if grpc_info is not None:  # the interceptor maps the outcome to a status
                return run(grpc_info, args, kwargs, with_info=False)
            parsed = _plain_info(args)
            if isinstance(parsed, BranchResponse):
                return parsed
            return handle(parsed, lambda: run(parsed, args, kwargs))

        return wrapper

    def _async_wrapper(func: Callable[..., Any]) -> Callable[..., Any]:
        from .asyncio.barrier import BranchBarrier as AsyncBranchBarrier

        async def run(
            info: BranchInfo, args: tuple[Any, ...], kwargs: dict[str, Any], with_info: bool = True
        ) -> Any:
            bb = AsyncBranchBarrier.from_info(info, table=table)
            conn_source = source(kwargs, True)
            given = {"info": info} if with_info else {}

            async def busi(tx: Any) -> Any:
                return _checked_value(await func(*args, **given, **{**kwargs, tx_arg: tx}))

            if backend == "mongo":
                return _answer(await bb.mongo_call(conn_source, busi))
            return _answer(await bb.call_with_db(conn_source, busi, dialect=dialect, join_transaction=False))

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            info = kwargs.pop("info", None)
            if info is not None:
                return await run(info, args, kwargs)
            grpc_info = _grpc_call_info(args)
            if grpc_info is not None:
                return await run(grpc_info, args, kwargs, with_info=False)
            parsed = _plain_info(args)
            if isinstance(parsed, BranchResponse):
                return parsed
            return await handle_async(parsed, lambda: run(parsed, args, kwargs))

        return wrapper

    return decorate
