"""``@barrier(db)``: run a branch handler's database work inside the barrier transaction.

This is the framework glue of the barrier; the public name is :func:`dtmcli.barrier.barrier`.
It imports :mod:`dtmcli.branch` and the storage package, and neither imports it back.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from typing import Any, Callable, Optional

from ._barrier.branch_barrier import BranchBarrier
from ._consts import RESULT_SUCCESS
from .branch import BranchInfo, BranchRequestError, error_response, handle, raise_for_result
from .errors import DtmInvalidInput

__all__ = ["barrier"]

logger = logging.getLogger("dtmcli")

_BACKENDS = ("sql", "mongo")


def barrier(
    db: Any,
    *,
    backend: str = "sql",
    table: Optional[str] = None,
    dialect: Optional[str] = None,
    tx_arg: str = "tx",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a branch handler so it runs once per branch op, inside the barrier transaction.

    ``db`` is where the connection comes from: a connection factory or pool's ``connect``
    (opened per call, closed after), a SQLAlchemy Engine, a connection/Session, ``"django"`` /
    ``"django:<alias>"``, or — with ``backend="mongo"`` — a MongoClient. The handler gets the
    transaction object as the keyword ``tx_arg`` (the connection, Session or Mongo session).
    A skipped call (duplicate, suspended, null compensation) returns ``{"dtm_result":"SUCCESS"}``
    without running the handler.

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

    Called without ``info`` (the plain form), the first argument is the request, its query mapping
    or a BranchInfo, and the result is the mapped :class:`~dtmcli.branch.BranchResponse`.
    """
    if backend not in _BACKENDS:
        raise DtmInvalidInput(f"barrier backend must be one of {', '.join(_BACKENDS)}, not {backend!r}")
    # Strings are resolved per call by the SQL barrier's one resolver; refuse a bad one now, not per request.
    if isinstance(db, str) and (backend == "mongo" or not (db == "django" or db.startswith("django:"))):
        raise DtmInvalidInput(f"db {db!r}: pass a connection, factory, engine, 'django' or 'django:<alias>'")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(func):
            raise TypeError("@barrier needs a synchronous handler: the database work runs in a blocking transaction")

        def run(info: BranchInfo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            bb = BranchBarrier.from_info(info, table=table)

            def busi(tx: Any) -> Any:
                value = func(*args, info=info, **{**kwargs, tx_arg: tx})
                # A returned FAILURE/ONGOING is raised here, so the barrier rolls the work back
                # exactly as for a raised DtmFailure (a later compensation is then a null one).
                raise_for_result(value)
                return value

            if backend == "mongo":
                result = bb.mongo_call(db, busi)
            else:
                result = bb.call_with_db(db, busi, dialect=dialect)
            return {"dtm_result": RESULT_SUCCESS} if result is None else result

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            info = kwargs.pop("info", None)
            if info is not None:
                return run(info, args, kwargs)
            if not args:
                raise DtmInvalidInput("@barrier handler called without info= or a request/query argument")
            try:
                parsed = args[0] if isinstance(args[0], BranchInfo) else BranchInfo.from_request(args[0])
            except BranchRequestError as exc:
                return error_response(exc)
            return handle(parsed, lambda: run(parsed, args, kwargs))

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

    return decorate
