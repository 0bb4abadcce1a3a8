"""The coordinator's HTTP front: ``/api/dtmsvr/*`` and ``/api/ping`` mapped onto the engine."""

from __future__ import annotations

import logging
from typing import Any

from ._engine import Engine
from ._httpserver import Handler, Server
from ._wire import encode_answer

__all__ = ["make_server"]

logger = logging.getLogger("dtmcli.testing")


def make_server(engine: Engine, host: str, port: int) -> Server:
    """An (unstarted) HTTP server answering DTM's API from ``engine``."""

    class DtmHandler(Handler):
        def _serve(self) -> None:
            path, query = self.split_path()
            body = self.read_body()
            if body is None:  # refused and answered
                return
            if not path.startswith("/api/"):
                self._answer(404, {"message": "404 page not found"})
                return
            status, answer = engine.handle(self.command, path[len("/api/") :], query, body)
            if logger.isEnabledFor(logging.INFO):
                gid = query.get("gid", "")
                logger.info("%s %s %s-> %d %s", self.command, path, f"gid={gid} " if gid else "", status,
                            answer.get("message", ""))
            self._answer(status, answer)

        def _answer(self, status: int, answer: Any) -> None:
            self.send_bytes(status, encode_answer(answer))

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Server((host, port), DtmHandler)
