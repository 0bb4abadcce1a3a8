"""Sans-I/O flows: every protocol decision is a generator that yields effects; drivers do the I/O.

A flow is ``Generator[Effect, Any, R]``. It yields an effect ("send this request", "sleep this
long", "run this statement", "call the user's function") and receives the effect's result, or has
the effect's exception thrown in at the ``yield``. Flows compose with ``yield from``. Two drivers run
them: :func:`run` performs each effect with blocking calls, :func:`arun` awaits them. The drivers
contain no protocol logic, so the sync and asyncio APIs share every rule (docs/design.md).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generator, Mapping, Optional, TypeVar

from ._protocol import Response

__all__ = [
    "Effect", "Flow", "Request", "Sleep", "Call", "StoreOp", "run", "arun", "done",
    "discard_awaitable", "is_async_function", "is_async_generator_function",
]

R = TypeVar("R")

Flow = Generator["Effect", Any, R]
"""A protocol decision: yields effects, receives their results, returns its outcome."""


class Effect:
    """One piece of I/O a flow asks its driver for. ``io`` is what the driver was given."""

    __slots__ = ()

    def run(self, io: Any) -> Any:
        """Perform the effect with blocking calls."""
        raise NotImplementedError

    async def arun(self, io: Any) -> Any:
        """Perform the effect without blocking the event loop."""
        raise NotImplementedError


class Request(Effect):
    """One HTTP request through ``io.transport`` (a Transport or an AsyncTransport); returns a Response."""

    __slots__ = ("body", "headers", "method", "params", "timeout", "url")

    def __init__(
        self,
        method: str,
        url: str,
        params: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> None:
        self.method, self.url, self.params, self.body = method, url, params, body
        self.headers, self.timeout = headers, timeout

    def run(self, io: Any) -> Response:
        return io.transport.request(  # type: ignore[no-any-return]
            self.method, self.url, params=self.params, body=self.body, headers=self.headers, timeout=self.timeout
        )

    async def arun(self, io: Any) -> Response:
        return await io.transport.request(  # type: ignore[no-any-return]
            self.method, self.url, params=self.params, body=self.body, headers=self.headers, timeout=self.timeout
        )

    def __repr__(self) -> str:
        return f"Request({self.method} {self.url} params={self.params})"


class Sleep(Effect):
    """Wait ``seconds`` (retry backoff). The sync driver uses ``sleep`` (the Retry's own)."""

    __slots__ = ("seconds", "sleep")

    def __init__(self, seconds: float, sleep: Callable[[float], None]) -> None:
        self.seconds, self.sleep = seconds, sleep

    def run(self, io: Any) -> None:
        self.sleep(self.seconds)

    async def arun(self, io: Any) -> None:
        import asyncio

        await asyncio.sleep(self.seconds)

    def __repr__(self) -> str:
        return f"Sleep({self.seconds})"


class Call(Effect):
    """Call user code ``fn(*args)``; the async driver awaits what it returns when it is awaitable."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def run(self, io: Any) -> Any:
        return self.fn(*self.args)

    async def arun(self, io: Any) -> Any:
        result = self.fn(*self.args)
        if inspect.isawaitable(result):
            result = await result
        return result

    def __repr__(self) -> str:
        return f"Call({getattr(self.fn, '__qualname__', self.fn)!r})"


class StoreOp(Effect):
    """A method call on a store the driver was given (``io.<name>(*args)``), e.g. a barrier statement."""

    __slots__ = ("args", "name")

    def __init__(self, name: str, *args: Any) -> None:
        self.name, self.args = name, args

    def run(self, io: Any) -> Any:
        return getattr(io, self.name)(*self.args)

    async def arun(self, io: Any) -> Any:
        return await getattr(io, self.name)(*self.args)

    def __repr__(self) -> str:
        return f"StoreOp({self.name})"


def _candidates(func: Any) -> tuple[Any, ...]:
    return (func, func.__call__) if callable(func) else (func,)  # an object's async __call__ counts too


def is_async_function(func: Any) -> bool:
    """True for an ``async def`` (or async generator) function, also behind partial or ``__call__``:
    something a blocking driver would call without its body ever running."""
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in _candidates(func))


def is_async_generator_function(func: Any) -> bool:
    """True for an async generator function (see :func:`is_async_function`)."""
    return any(inspect.isasyncgenfunction(f) for f in _candidates(func))


def discard_awaitable(value: Any) -> bool:
    """True when ``value`` is awaitable, which a blocking driver cannot await: it is closed, so that
    no "coroutine was never awaited" warning hides the error the caller raises."""
    if not inspect.isawaitable(value):
        return False
    close = getattr(value, "close", None)
    if callable(close):
        close()
    return True


def done(value: R) -> Flow[R]:
    """A flow that performs nothing and returns ``value``."""
    return value
    yield  # pragma: no cover - makes this a generator


def run(flow: Flow[R], io: Any = None) -> R:
    """Drive ``flow`` to its end with blocking I/O on ``io``; return its outcome or raise its error."""
    value: Any = None
    failed = False
    send, throw = flow.send, flow.throw
    try:
        while True:
            try:
                effect = throw(value) if failed else send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                value, failed = effect.run(io), False
            except BaseException as exc:
                value, failed = exc, True
    finally:
        value = None  # no reference cycle through a caught exception's traceback


async def arun(flow: Flow[R], io: Any = None) -> R:
    """Drive ``flow`` to its end awaiting each effect on ``io``; return its outcome or raise its error.

    A cancellation while an effect is awaited is thrown into the flow like any other error, so the
    flow's own cleanup (state rollback, an abort) runs before it propagates.
    """
    value: Any = None
    failed = False
    send, throw = flow.send, flow.throw
    try:
        while True:
            try:
                effect = throw(value) if failed else send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                value, failed = await effect.arun(io), False
            except BaseException as exc:
                value, failed = exc, True
    finally:
        value = None
