"""``DtmTestServer``: the in-process DTM-compatible coordinator, for tests and local development.

It speaks DTM's HTTP API on ``127.0.0.1`` and processes saga, tcc, xa and msg transactions the way
DTM v1.19.0 does. With the default *manual* clock nothing happens by time alone: ``advance(seconds)``
moves the clock and runs every retry that became due, so a retry test takes milliseconds. With
``clock="real"`` a background cron thread polls like the real server. Never use it in production.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from .._models import Transaction
from ._branch_client import BranchCaller
from ._clock import Clock, ManualClock, RealClock
from ._dispatch import DispatchingBranchCaller
from ._engine import Engine, EngineConfig
from ._http import make_server
from ._httpserver import Server
from ._store import MemoryStore, SqliteStore

if TYPE_CHECKING:
    from ._grpc import GrpcApi

__all__ = ["DtmTestServer"]

logger = logging.getLogger("dtmcli.testing")

_FINAL = ("succeed", "failed")


class DtmTestServer:
    """A DTM-compatible coordinator running in this process.

    >>> with DtmTestServer() as dtm:
    ...     Saga(dtm.url).add(...).submit()
    ...     dtm.wait_final(gid)

    ``clock``: ``"manual"`` (default; move it with :meth:`advance`), ``"real"`` (a cron thread polls
    every ``cron_interval`` seconds) or a :class:`Clock`. ``sqlite_path`` keeps state in a SQLite
    file so a restart resumes unfinished transactions. ``retry_interval``, ``timeout_to_fail`` and
    ``request_timeout`` are the server defaults (DTM's 10, 35 and 3 seconds). ``update_branch_sync``
    is DTM's ``UpdateBranchSync``: workflow progress is stored even when registerBranch has no ``sync``.
    ``grpc_port`` (``0`` for any free port; needs the ``grpc`` extra) also serves DTM's gRPC API
    (``dtmgimp.Dtm``) at :attr:`grpc_target`; gRPC branch URLs are called whether or not it is on.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Union[str, Clock] = "manual",
        sqlite_path: Optional[str] = None,
        retry_interval: int = 10,
        timeout_to_fail: int = 35,
        request_timeout: int = 3,
        cron_interval: float = 0.2,
        max_passes_per_tick: int = 100,
        workers: int = 16,
        caller: Optional[BranchCaller] = None,
        update_branch_sync: bool = False,
        grpc_port: Optional[int] = None,
    ) -> None:
        if isinstance(clock, str):
            if clock not in ("manual", "real"):
                raise ValueError(f"clock must be 'manual', 'real' or a Clock, not {clock!r}")
            self.clock: Clock = ManualClock() if clock == "manual" else RealClock()
        else:
            self.clock = clock
        self.store = SqliteStore(sqlite_path) if sqlite_path else MemoryStore()
        self.caller = caller if caller is not None else DispatchingBranchCaller()
        config = EngineConfig(retry_interval, timeout_to_fail, request_timeout, max_passes_per_tick, workers)
        self.engine = Engine(self.store, self.clock, self.caller, config, update_branch_sync=update_branch_sync)
        self.cron_interval = cron_interval
        self._host, self._port = host, port
        self._server: Optional[Server] = None
        self._grpc_port = grpc_port
        self._grpc: Optional[GrpcApi] = None  # imported only when asked for: grpcio is optional
        self._cron: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> DtmTestServer:
        """Bind and serve (and start the cron thread in real-time mode)."""
        if self._server is not None:
            return self
        self._server = make_server(self.engine, self._host, self._port)
        if self._grpc_port is not None:
            from ._grpc import GrpcApi

            try:
                self._grpc = GrpcApi(self.engine, self._host, self._grpc_port, self.engine.config.workers)
            except BaseException:
                self._server.server_close()
                self._server = None
                raise
            self._grpc.start()
        self._server.start()
        if not isinstance(self.clock, ManualClock):
            self._cron = threading.Thread(target=self._cron_loop, name="dtm-cron", daemon=True)
            self._cron.start()
        logger.info("dtm test coordinator listening on %s", self.url)
        return self

    def close(self) -> None:
        """Stop the cron, the HTTP server and the workers; close pooled connections and the store."""
        self._stop.set()
        if self._cron is not None:
            self._cron.join()
            self._cron = None
        if self._grpc is not None:
            self._grpc.stop()
            self._grpc = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.engine.close()
        self.caller.close()
        self.store.close()

    def __enter__(self) -> DtmTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cron_loop(self) -> None:
        while not self._stop.wait(self.cron_interval):
            try:
                while self.engine.run_due() and not self._stop.is_set():
                    pass
            except Exception:  # keep the cron alive; the error is logged
                logger.exception("cron pass failed")

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("DtmTestServer is not started")
        return self._server.port

    @property
    def serves_grpc(self) -> bool:
        """Whether DTM's gRPC API is being served (started with ``grpc_port``)."""
        return self._grpc is not None

    @property
    def grpc_target(self) -> str:
        """The gRPC API's address ``host:port`` (for ``DtmGrpcClient``); needs ``grpc_port``."""
        if self._grpc is None:
            raise RuntimeError("DtmTestServer serves no gRPC API: start it with grpc_port=0 (or a port)")
        return f"{self._host}:{self._grpc.port}"

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{self._host}:{self.port}"

    @property
    def url(self) -> str:
        """The DTM URL to give to clients: ``http://host:port/api/dtmsvr``."""
        return f"{self.base_url}/api/dtmsvr"

    # -- inspection and time -----------------------------------------------------------------

    def query_json(self, gid: str) -> dict[str, Any]:
        """Exactly what ``GET /query?gid=`` answers."""
        return self.engine.query_json(gid)

    def query(self, gid: str) -> Optional[Transaction]:
        """The transaction with its branches (``None`` when unknown)."""
        raw = self.query_json(gid)
        if raw["transaction"] is None:
            return None
        return Transaction.from_json(raw["transaction"], raw["branches"])

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every asynchronous pass (e.g. after a submit without wait_result) has finished."""
        if not self.engine.wait_idle(timeout):
            raise TimeoutError(f"coordinator still busy after {timeout} s")

    def run_due(self) -> int:
        """Run what is due at the current clock time (after waiting for running passes)."""
        self.wait_idle()
        count = 0
        while True:
            ran = self.engine.run_due()
            count += ran
            if not ran:
                return count

    def advance(self, seconds: float) -> int:
        """Move the manual clock forward, running every retry that falls due on the way, in time order.

        Returns how many cron passes ran. Each step jumps to the next due time, so a backoff series
        (2, 4, 8 s ...) plays out exactly as the real cron would, minus its polling jitter.
        """
        if not isinstance(self.clock, ManualClock):
            raise RuntimeError("advance() needs the manual clock")
        target = self.clock.now() + seconds
        passes = 0
        self.wait_idle()
        for _ in range(10_000):
            due = self.engine.next_due_time()
            if due is None or due > target:
                break
            self.clock.set(due)
            ran = self.run_due()
            passes += ran
            if not ran:
                break
        self.clock.set(target)
        return passes + self.run_due()

    def wait_final(self, gid: str, timeout: float = 10.0) -> Transaction:
        """Wait (real time, without moving the clock) until ``gid`` is succeed or failed."""
        return self.wait_status(gid, _FINAL, timeout)

    def wait_status(self, gid: str, statuses: Iterable[str], timeout: float = 10.0) -> Transaction:
        """Wait (real time) until ``gid`` has one of ``statuses``; TimeoutError otherwise."""
        wanted = set(statuses)
        deadline = time.monotonic() + timeout
        while True:
            self.engine.wait_idle(max(0.0, deadline - time.monotonic()))
            trans = self.query(gid)
            if trans is not None and trans.status in wanted:
                return trans
            if time.monotonic() >= deadline:
                status = trans.status if trans else "unknown"
                raise TimeoutError(f"{gid} is {status}, not {sorted(wanted)}, after {timeout} s")
            time.sleep(0.01)
