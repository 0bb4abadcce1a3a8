"""``DtmFacade``: one small interface over the in-process coordinator or a real DTM server.

End-to-end tests use it through the ``dtm`` pytest fixture, so they run unchanged against both:
waiting polls ``/query`` and ``advance`` moves the manual clock in process, or waits real time
(after ``resetNextCronTime`` for the given gids) against a real server.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

from .._models import Transaction
from ..client import DtmClient
from .server import DtmTestServer

__all__ = ["DtmFacade"]


class DtmFacade:
    """``url``, ``query``, ``wait_status``, ``advance`` and ``is_real`` for end-to-end tests.

    ``grpc_target`` is the ``host:port`` of the coordinator's gRPC API (``None`` when it serves none):
    the in-process server's when started with ``grpc_port``, else the one given for a real server.
    """

    def __init__(
        self, *, server: Optional[DtmTestServer] = None, url: Optional[str] = None, grpc_target: Optional[str] = None
    ) -> None:
        if (server is None) == (url is None):
            raise ValueError("give either an in-process server or the URL of a real DTM server")
        self.server = server
        self.url: str = server.url if server is not None else str(url).rstrip("/")
        if grpc_target is None and server is not None and server.serves_grpc:
            grpc_target = server.grpc_target
        self.grpc_target: Optional[str] = grpc_target
        self.client = DtmClient(self.url)

    @property
    def is_real(self) -> bool:
        """True when backed by a real DTM server (``--dtm-server``)."""
        return self.server is None

    def query(self, gid: str) -> Optional[Transaction]:
        """The transaction with its branches, ``None`` when unknown."""
        return self.client.query(gid)

    def wait_status(self, gid: str, statuses: Iterable[str] = ("succeed", "failed"),
                    timeout: Optional[float] = None) -> Transaction:
        """Poll until ``gid`` reaches one of ``statuses``; TimeoutError (with the last status) otherwise.

        ``timeout`` defaults to 10 s in process and 30 s against a real server, whose cron works through
        one due transaction at a time (a backlog of retries from earlier tests delays the next one)."""
        if self.server is not None:
            return self.server.wait_status(gid, statuses, 10.0 if timeout is None else timeout)
        timeout = 30.0 if timeout is None else timeout
        wanted = set(statuses)
        deadline = time.monotonic() + timeout
        while True:
            trans = self.query(gid)
            if trans is not None and trans.status in wanted:
                # With UpdateBranchSync 0 a SQL-store DTM writes branch statuses in the background
                # (every 200 ms), so they may lag the final global status: read once more.
                time.sleep(0.3)
                return self.query(gid) or trans
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{gid} is {trans.status if trans else 'unknown'}, not {sorted(wanted)}")
            time.sleep(0.1)

    def advance(self, seconds: float, gids: Iterable[str] = ()) -> None:
        """Let ``seconds`` of coordinator time pass: instantly in process; for real, reset the cron of
        ``gids`` (effective on SQL stores) and sleep."""
        if self.server is not None:
            self.server.advance(seconds)
            return
        for gid in gids:
            self.client.reset_next_cron_time(gid)
        time.sleep(seconds)

    def close(self) -> None:
        """Close the client pool (the server belongs to whoever made it)."""
        self.client.close()
