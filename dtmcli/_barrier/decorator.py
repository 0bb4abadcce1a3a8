"""``@barrier(db)``: run a branch handler's database work inside the barrier transaction.

Stacked under a framework integration, which passes ``info=BranchInfo``::

    @app.post("/TransOutCompensate")          # Flask (Django: the same with dtmcli.contrib.django)
    @branch_handler
    @barrier(db=pool.connection)
    def compensate(info: BranchInfo, tx):     # tx: the connection, inside the barrier transaction
        ...

    @app.post("/TransOutCompensate")          # FastAPI (with add_exception_handlers(app))
    @barrier(db=engine)
    def compensate(info: BranchDep, tx=None):
        ...

Called without ``info`` (the plain form), the first argument is the request or its query mapping
and the result is the mapped :class:`~dtmcli.branch.BranchResponse`. Duplicate, suspended and
null-compensation calls answer success without running the handler.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._consts import RESULT_SUCCESS
from ..errors import DtmInvalidInput

if TYPE_CHECKING:
    from ..barrier import BranchBarrier
    from ..branch import BranchInfo

__all__ = ["barrier"]

logger = logging.getLogger("dtmcli")

_BACKENDS = ("sql", "mongo")


def _resolve_db(db: Any) -> Any:
    if isinstance(db, str):
        if db == "django" or db.startswith("django:"):
            from django.db import connections

            return connections[db.split(":", 1)[1] if ":" in db else "default"]
        raise DtmInvalidInput(f"db {db!r}: pass a connection, factory, engine, 'django' or 'django:<alias>'")
    return db


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
    A skipped call (duplicate, suspended, null compensation) returns ``{"dtm_result":"SUCCESS"}``.
    """
    if backend not in _BACKENDS:
        raise DtmInvalidInput(f"barrier backend must be one of {', '.join(_BACKENDS)}, not {backend!r}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(func):
            raise TypeError("@barrier needs a synchronous handler: the database work runs in a blocking transaction")

        def run(info: BranchInfo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            from ..barrier import BranchBarrier

            bb: BranchBarrier = (
                BranchBarrier(info.trans_type, info.gid, info.branch_id, info.op, table=table)
                if table is not None else info.barrier()
            )
            source = _resolve_db(db)

            def busi(tx: Any) -> Any:
                return func(*args, info=info, **{**kwargs, tx_arg: tx})

            result = bb.mongo_call(source, busi) if backend == "mongo" else bb.call_with_db(
                source, busi, dialect=dialect
            )
            if result is None:
                return {"dtm_result": RESULT_SUCCESS}
            return result

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            info = kwargs.pop("info", None)
            if info is not None:
                return run(info, args, kwargs)
            from ..branch import BranchInfo, BranchRequestError, error_response, handle

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
