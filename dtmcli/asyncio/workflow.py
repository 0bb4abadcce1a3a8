"""Workflow mode for asyncio: :mod:`dtmcli.workflow` with ``async def`` workflow functions, awaited.

>>> from dtmcli.asyncio import workflow
>>> workflow.init_http(DTM, "http://order-svc:8000/api/workflow/resume")
>>> @workflow.register("transfer")
... async def transfer(wf: workflow.Workflow, data: bytes) -> bytes | None:
...     wf.new_branch().on_rollback(revert_out)                 # async def revert_out(bb): ...
...     await wf.request("POST", f"{busi}/TransOut", json=json.loads(data))
...     await wf.new_branch().do(local_step)                   # async def local_step(bb) -> bytes
...     return b"done"
>>> await workflow.execute("transfer", gid, data)

Same decisions as the sync module (one core, :mod:`dtmcli._workflow`). A cancelled ``execute``
leaves the workflow prepared (nothing more is recorded or submitted); DTM resumes it later.
Callbacks (``do``, ``on_commit``, ``on_rollback``, ``on_finish``) may be ``async def`` or plain
functions; ``bb`` is a :class:`dtmcli.asyncio.BranchBarrier`. A step (``request``/``do``/``do_xa``)
the function creates and never awaits is refused when the function returns (DtmInvalidInput, nothing
committed or submitted); when the function raises DtmFailure such a step (which never ran) is dropped
with a WARNING naming it, and the workflow rolls back. The rules of :mod:`dtmcli.workflow`
(determinism, at-least-once steps, one execution per gid in this process, the resume URL reachable
by DTM only) hold here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Awaitable, Callable, Mapping, Optional, TypeVar, Union

from .. import _flow
from .._barrier.core import DEFAULT_TABLE
from .._consts import WORKFLOW
from .._workflow import (
    Registry,
    StepFailure,
    StepResponse,
    WorkflowConflict,
    WorkflowCore,
    WorkflowPhase2Error,
    query_name_gid,
)
from .barrier import BranchBarrier
from .client import as_async_client

__all__ = [
    "StepFailure",
    "StepResponse",
    "Workflow",
    "WorkflowConflict",
    "WorkflowFunc",
    "WorkflowPhase2Error",
    "execute",
    "execute_by_qs",
    "init_http",
    "is_registered",
    "register",
    "registry",
    "unregister",
]

WorkflowFunc = Callable[["Workflow", bytes], Awaitable[Optional[bytes]]]
"""An async workflow function: ``async def fn(wf, data) -> bytes | None``."""

T = TypeVar("T")


class _Step(Coroutine[Any, Any, T]):
    """A step's coroutine, pending in its workflow until it is first awaited (or driven, or closed)."""

    __slots__ = ("_coro", "_pending", "label")

    def __init__(self, coro: Coroutine[Any, Any, T], pending: set[Any], label: str) -> None:
        self._coro, self._pending, self.label = coro, pending, label
        pending.add(self)

    def abandon(self) -> str:
        """Make sure the step never runs: cancel the Task that owns it (it has not started), else close
        it. Returns its description."""
        self._pending.discard(self)
        try:
            tasks = asyncio.all_tasks()
        except RuntimeError:  # no running loop
            tasks = set()
        owner = next((t for t in tasks if t.get_coro() is self), None)
        if owner is not None:
            owner.cancel()  # a Task cancelled before its first step never sends into the coroutine
        else:
            self._coro.close()
        return self.label

    def __await__(self) -> Generator[Any, None, T]:
        self._pending.discard(self)
        return self._coro.__await__()

    def send(self, value: Any) -> Any:
        self._pending.discard(self)
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        self._pending.discard(self)
        return self._coro.throw(*args)

    def close(self) -> None:
        self._pending.discard(self)
        self._coro.close()


class Workflow(WorkflowCore):
    """One execution of an async workflow (see :class:`dtmcli.workflow.Workflow`; steps are awaited)."""

    _blocking = False

    def _barrier(self, branch_id: str, op: str) -> BranchBarrier:
        return BranchBarrier(WORKFLOW, self.gid, branch_id, op)

    def _step(self, flow: _flow.Flow[T], what: str) -> Coroutine[Any, Any, T]:
        return _Step(_flow.arun(flow, self._client), self._pending, f"{what} of branch {self._branch or '-'}")

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: Union[bytes, str, None] = None,
        params: Optional[Mapping[str, str]] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Coroutine[Any, Any, StepResponse]:
        """Call ``url`` as the current branch's recorded step (see :meth:`dtmcli.workflow.Workflow.request`);
        await it."""
        flow = self._http_flow(method, url, json=json, data=data, params=params, headers=headers)
        return self._step(flow, f"request({method!r}, {url!r})")

    def do(
        self, fn: Callable[[BranchBarrier], Union[Awaitable[Optional[bytes]], Optional[bytes]]]
    ) -> Coroutine[Any, Any, bytes]:
        """Run ``fn(bb)`` as the current branch's recorded local step (see :meth:`dtmcli.workflow.Workflow.do`);
        await it."""
        return self._step(self._do_flow(fn), "do()")

    def do_xa(
        self, conn: Any, fn: Callable[[Any], Awaitable[Optional[bytes]]], *, table: str = DEFAULT_TABLE,
        dialect: Optional[str] = None,
    ) -> Coroutine[Any, Any, bytes]:
        """Run ``fn(conn)`` as the current branch's step in a local XA transaction (see
        :meth:`dtmcli.workflow.Workflow.do_xa`); ``conn`` is what :func:`dtmcli.asyncio.xa_local_transaction`
        takes (an ``async def`` factory preferred). Await it."""
        return self._step(self._do_xa_flow(conn, fn, table, dialect), "do_xa()")

    async def _xa_local(self, conn: Any, info: Any, fn: Callable[[Any], Any], register: _flow.Flow[None],
                        table: str, dialect: Optional[str]) -> Any:
        from .._barrier.xa import local_transaction_flow
        from ._barrier_sql import connection_from
        from .xa import _open

        async with connection_from(conn) as dedicated:
            io = _open(dedicated, dialect, self._client.transport)  # type: ignore[attr-defined]
            return await _flow.arun(local_transaction_flow(info, io.dialect, table, fn, dedicated, register), io)

    async def _xa_phase2(self, conn: Any, bb: Any, table: str, dialect: Optional[str]) -> None:
        from ..branch import BranchInfo
        from .xa import xa_handle_phase2

        await xa_handle_phase2(BranchInfo(bb.gid, WORKFLOW, bb.branch_id, bb.op), conn, table=table, dialect=dialect)


class _AsyncRegistry(Registry):
    def __init__(self) -> None:
        super().__init__(as_async_client, blocking=False)


registry = _AsyncRegistry()
"""The default async registry :func:`register`, :func:`execute` and the async resume endpoints use."""


init_http = registry.init_http
register = registry.decorate
unregister = registry.unregister
is_registered = registry.is_registered


async def execute(name: str, gid: str, data: bytes) -> bytes:
    """Run, resume or look up the workflow ``name`` for ``gid`` (see :func:`dtmcli.workflow.execute`)."""
    entry, client, callback = registry.lookup(name)
    wf = Workflow(entry, client, callback, gid, data)
    with registry.running(wf.gid):
        return await _flow.arun(wf._execute_flow(entry.fn, wf), client)


async def execute_by_qs(query: Mapping[str, Any], body: bytes) -> bytes:
    """:func:`execute` for DTM's resume call: the name is ``query["op"]``, the gid ``query["gid"]``."""
    name, gid = query_name_gid(query)
    return await execute(name, gid, body)
