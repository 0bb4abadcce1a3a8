"""Glue shared by the framework integrations."""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, TypeVar

from ..branch import BranchInfo, BranchResponse, handle

__all__ = ["run_handler"]

NativeT = TypeVar("NativeT")


class _Passthrough(Generic[NativeT]):
    """Remembers a native framework response a handler returned, so it is sent unchanged."""

    def __init__(self, native_type: type[NativeT]) -> None:
        self.native_type = native_type
        self.value: Optional[NativeT] = None


def run_handler(
    info: BranchInfo, call: Callable[[], Any], native_type: type[NativeT]
) -> tuple[BranchResponse, Optional[NativeT]]:
    """:func:`~dtmcli.branch.handle` ``call``; a returned ``native_type`` response comes back as is.

    Returns the mapped answer and, when the handler succeeded with a framework response, that response.
    """
    keep = _Passthrough(native_type)

    def wrapped() -> Any:
        value = call()
        if isinstance(value, keep.native_type):
            keep.value = value
            return None
        return value

    answer = handle(info, wrapped)
    return answer, keep.value if answer.status == 200 else None
