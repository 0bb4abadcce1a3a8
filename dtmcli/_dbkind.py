"""Whether a database object's calls block or must be awaited, told from where its class comes from.

One table for the whole SDK: the sync barrier refuses async connections, the async barrier refuses
blocking ones, and the barrier decorator matches the database to the handler (``def`` / ``async def``).
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["SYNC", "ASYNC", "async_backend_supports", "kind_of", "object_kind"]

SYNC, ASYNC = "sync", "async"

_ASYNC_TOPS = frozenset({"asyncpg", "aiomysql", "aiopg", "asyncmy", "aiosqlite", "motor"})
_ASYNC_PREFIXES = ("sqlalchemy.ext.asyncio", "pymongo.asynchronous", "redis.asyncio")
_SYNC_TOPS = frozenset(
    {"pymysql", "MySQLdb", "mysql", "psycopg2", "sqlalchemy", "django", "pymongo", "redis", "dbutils", "sqlite3"}
)
_PSYCOPG = frozenset({"psycopg", "psycopg_pool"})  # one package for both: the class name tells (AsyncConnection)


def kind_of(module: str, name: str) -> Optional[str]:
    """``ASYNC``, ``SYNC`` or ``None`` (unknown) for a class or function ``name`` of ``module``."""
    top = module.split(".")[0]
    if top in _ASYNC_TOPS or module.startswith(_ASYNC_PREFIXES):
        return ASYNC
    if top in _PSYCOPG:
        return ASYNC if name.startswith("Async") else SYNC
    return SYNC if top in _SYNC_TOPS else None


# What the asyncio barrier of each backend can use. aiopg, asyncmy, aiosqlite and motor are async
# (the blocking barrier refuses them) but the asyncio barrier has no adapter for them.
_ASYNC_SUPPORTED = {
    "sql": ("asyncpg", "aiomysql", "psycopg", "psycopg_pool", "sqlalchemy.ext.asyncio"),
    "mongo": ("pymongo.asynchronous",),
}


def async_backend_supports(module: str, name: str, backend: str) -> bool:
    """Whether the asyncio ``backend`` barrier can use an async database of class/function ``name`` in
    ``module``; ``True`` when its kind cannot be told (an application's own factory)."""
    if kind_of(module, name) != ASYNC:
        return True
    return any(module == p or module.startswith(p + ".") for p in _ASYNC_SUPPORTED.get(backend, ()))


def object_kind(obj: Any) -> Optional[str]:
    """The kind of a connection, pool, engine, session or client object (see :func:`kind_of`)."""
    cls = type(obj)
    return kind_of(cls.__module__, cls.__name__)
