"""Run one test body with the sync API (``dtmcli``) and with the asyncio one (``dtmcli.asyncio``).

>>> from flavours import Flavour, both
>>> @both
... def test_saga(flavour: Flavour, dtm: DtmFacade) -> None:
...     saga = flavour.m.Saga(dtm.url).add(...)
...     flavour.run(saga.submit())        # a call in sync, asyncio.run(...) in async

Each ``run`` of the async flavour is its own ``asyncio.run``, so a test also checks that the shared
:class:`~dtmcli.asyncio.AsyncDtmClient` of an address serves successive event loops. Tests that need
several awaits in one loop write an ``async def`` and pass its coroutine to ``run``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Awaitable, Callable, TypeVar, Union

import pytest

__all__ = ["Flavour", "SYNC", "ASYNC", "FLAVOURS", "both"]

R = TypeVar("R")


@dataclass(frozen=True)
class Flavour:
    """One of the two APIs: ``m`` is the module (``Saga``, ``Msg``, the client class ...)."""

    name: str
    module: str

    @property
    def m(self) -> ModuleType:
        """``dtmcli`` or ``dtmcli.asyncio`` (imported on first use, so a broken twin fails only its tests)."""
        return importlib.import_module(self.module)

    @property
    def is_async(self) -> bool:
        return self.name == "async"

    @property
    def Client(self) -> Any:
        """``DtmClient`` or ``AsyncDtmClient``."""
        return self.m.AsyncDtmClient if self.is_async else self.m.DtmClient

    def run(self, x: Union[Awaitable[R], R]) -> R:
        """``x`` itself, or the result of ``asyncio.run(x)`` when ``x`` is a coroutine."""
        if inspect.iscoroutine(x):
            return asyncio.run(x)  # type: ignore[no-any-return]
        if inspect.isawaitable(x):
            raise TypeError(f"{x!r} is awaitable but not a coroutine: wrap it in an async def")
        return x

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, run to its end in either flavour."""
        return self.run(fn(*args, **kwargs))

    def busi(self, fn: Callable[..., R]) -> Callable[..., Any]:
        """A business function in the flavour's own style: ``fn`` as is, or an ``async def`` calling it."""
        if not self.is_async:
            return fn

        @functools.wraps(fn)
        async def busi(*args: Any, **kwargs: Any) -> R:
            await asyncio.sleep(0)  # a real suspension point inside the local work
            return fn(*args, **kwargs)

        return busi

    def __repr__(self) -> str:
        return self.name


SYNC = Flavour("sync", "dtmcli")
ASYNC = Flavour("async", "dtmcli.asyncio")
FLAVOURS = (SYNC, ASYNC)

both = pytest.mark.parametrize("flavour", FLAVOURS, ids=[f.name for f in FLAVOURS])
"""Parametrise a test (or a module, as ``pytestmark = both``) over the sync and async flavours."""
