"""Serving test gRPC branch services: a blocking ``grpc.server`` or a ``grpc.aio`` one on an event loop
in a thread, both with dtmcli's interceptor, on 127.0.0.1 and a free port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterable, Iterator, Optional

import grpc
import grpc.aio

from dtmcli.grpc import AsyncDtmServerInterceptor, DtmServerInterceptor


class AioLoop:
    """An event loop in a thread, serving a grpc.aio server (and what its handlers await)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def grpc_service(
    kind: str,
    handlers: grpc.GenericRpcHandler,
    *,
    start: Optional[Callable[[], Awaitable[None]]] = None,
    stop: Optional[Callable[[], Awaitable[None]]] = None,
) -> Iterator[str]:
    """Serve ``handlers`` (``kind`` ``sync``: grpc.server; else grpc.aio, with ``start``/``stop`` awaited on
    its loop before it starts and after it stops); yields the ``host:port`` target."""
    if kind == "sync":
        server = grpc.server(ThreadPoolExecutor(8), interceptors=[DtmServerInterceptor()])
        server.add_generic_rpc_handlers((handlers,))
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        try:
            yield target
        finally:
            server.stop(0).wait()
        return
    aio = AioLoop()

    async def begin() -> tuple[Any, str]:
        if start is not None:
            await start()
        srv = grpc.aio.server(interceptors=[AsyncDtmServerInterceptor()])
        srv.add_generic_rpc_handlers((handlers,))
        address = f"127.0.0.1:{srv.add_insecure_port('127.0.0.1:0')}"
        await srv.start()
        return srv, address

    async def end(srv: Any) -> None:
        await srv.stop(0)
        if stop is not None:
            await stop()

    try:
        srv, target = aio.run(begin())
        try:
            yield target
        finally:
            aio.run(end(srv))
    finally:
        aio.close()


def raw_handlers(
    service: str,
    methods: Iterable[str],
    kind: str,
    handle: Callable[[str, bytes, Any], Any],
    ahandle: Callable[[str, bytes, Any], Awaitable[Any]],
) -> grpc.GenericRpcHandler:
    """Raw-bytes unary handlers for ``methods`` of ``service``: ``handle(method, request, context)`` (kind
    ``sync``) or ``await ahandle(...)``; returning None answers the empty reply."""
    table = {}
    for method in methods:
        if kind == "sync":
            def fn(request: bytes, context: Any, method: str = method) -> Any:
                return handle(method, request, context)
        else:
            async def fn(request: bytes, context: Any, method: str = method) -> Any:  # type: ignore[misc]
                return await ahandle(method, request, context)
        table[method] = grpc.unary_unary_rpc_method_handler(fn)
    return grpc.method_handlers_generic_handler(service, table)
