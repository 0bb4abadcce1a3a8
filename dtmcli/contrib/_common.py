"""Glue shared by the framework integrations."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Generic, Optional, TypeVar

from ..branch import BranchInfo, BranchResponse, handle, handle_async, is_async_callable

__all__ = ["is_async_callable", "run_handler", "run_handler_async"]

NativeT = TypeVar("NativeT")


class _Passthrough(Generic[NativeT]):
    """Remembers a native framework response a handler returned, so it is sent unchanged."""

    def __init__(self, native_type: type[NativeT]) -> None:
        self.native_type = native_type
        self.value: Optional[NativeT] = None

    def take(self, value: Any) -> Any:
        """``value`` for the mapping; a native response is kept aside (and maps as ``None``)."""
        if isinstance(value, self.native_type):
            self.value = value
            return None
        return value

    def result(self, answer: BranchResponse) -> tuple[BranchResponse, Optional[NativeT]]:
        return answer, self.value if answer.status == 200 else None


def run_handler(
    info: BranchInfo, call: Callable[[], Any], native_type: type[NativeT]
) -> tuple[BranchResponse, Optional[NativeT]]:
    """:func:`~dtmcli.branch.handle` ``call``; a returned ``native_type`` response comes back as is.

    Returns the mapped answer and, when the handler succeeded with a framework response, that response.
    """
    keep = _Passthrough(native_type)
    return keep.result(handle(info, lambda: keep.take(call())))


async def run_handler_async(
    info: BranchInfo, call: Callable[[], Awaitable[Any]], native_type: type[NativeT]
) -> tuple[BranchResponse, Optional[NativeT]]:
    """:func:`run_handler` for a coroutine: ``await call()`` on the running loop."""
    keep = _Passthrough(native_type)

    async def wrapped() -> Any:
        return keep.take(await call())

    return keep.result(await handle_async(info, wrapped))
