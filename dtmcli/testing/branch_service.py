"""``BranchService``: a scripted HTTP branch server for tests (threaded HTTP/1.1, TCP_NODELAY, chunked bodies).

>>> with BranchService() as svc:
...     svc.route("/TransOut", 200, 200, (409, {"dtm_result": "FAILURE"}))
...     ...
...     assert [c.query["op"] for c in svc.calls("/TransOut")] == ["action"]

Answers for a route are used in order and the last one repeats. An answer is a status (200, 409
and 425 get the matching ``dtm_result`` body, others an empty body), a ``(status, body)`` tuple, an
:class:`Answer`, or a callable taking the :class:`Call` and returning any of those.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ._httpserver import Handler, Server

__all__ = ["Answer", "BranchService", "Call", "AnswerSpec"]

_DEFAULT_BODIES = {200: {"dtm_result": "SUCCESS"}, 409: {"dtm_result": "FAILURE"}, 425: {"dtm_result": "ONGOING"}}


@dataclass(frozen=True)
class Call:
    """One request the service received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: str

    @property
    def op(self) -> str:
        """The ``op`` query parameter (``action``, ``compensate``, ``confirm`` ...)."""
        return self.query.get("op", "")

    @property
    def branch_id(self) -> str:
        """The ``branch_id`` query parameter."""
        return self.query.get("branch_id", "")

    def json(self) -> Any:
        """The body parsed as JSON (``None`` when empty)."""
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class Answer:
    """A scripted answer: status, body (str/bytes sent as is, anything else as JSON), delay before answering."""

    status: int = 200
    body: Any = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The body bytes."""
        body = _DEFAULT_BODIES.get(self.status, "") if self.body is None else self.body
        if isinstance(body, bytes):
            return body
        if isinstance(body, str):
            return body.encode()
        return json.dumps(body).encode()


AnswerSpec = Union[int, tuple[int, Any], Answer, Callable[[Call], Any]]


def _to_answer(spec: Any, call: Call) -> Answer:
    if callable(spec) and not isinstance(spec, Answer):
        spec = spec(call)
    if isinstance(spec, Answer):
        return spec
    if isinstance(spec, int):
        return Answer(spec)
    if isinstance(spec, tuple) and len(spec) == 2:
        return Answer(int(spec[0]), spec[1])
    if spec is None:
        return Answer()
    raise TypeError(f"not an answer: {spec!r}")


class BranchService:
    """A threaded HTTP/1.1 server on ``127.0.0.1`` answering routes with scripted answers and recording calls.

    Paths without a route get ``default`` (200 SUCCESS; ``None`` answers 404).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, default: Optional[AnswerSpec] = 200) -> None:
        self._host = host
        self._default = default
        self._routes: dict[str, list[Any]] = {}
        self._used: dict[str, int] = {}
        self._calls: list[Call] = []
        self._cond = threading.Condition()
        service = self

        class BranchHandler(Handler):
            def _serve(self) -> None:
                path, query = self.split_path()
                raw = self.read_body()
                if raw is None:  # refused and answered
                    return
                headers = {k: v for k, v in self.headers.items()}
                call = Call(self.command, path, query, headers, raw.decode("utf-8", "replace"))
                answer = service._answer(call)
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_bytes(answer.status, answer.encode(), headers=answer.headers)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self._server = Server((host, port), BranchHandler)
        self._server.start()

    def _answer(self, call: Call) -> Answer:
        with self._cond:
            self._calls.append(call)
            specs = self._routes.get(call.path)
            if specs is None:
                self._cond.notify_all()
                if self._default is None:
                    return Answer(404, f"no route for {call.path}")
                return _to_answer(self._default, call)
            index = self._used.get(call.path, 0)
            self._used[call.path] = index + 1
            spec = specs[min(index, len(specs) - 1)]
            self._cond.notify_all()
        return _to_answer(spec, call)

    # -- configuration -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port."""
        return self._server.port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self._host}:{self.port}"

    def url(self, path: str) -> str:
        """The full URL of ``path`` (which starts with ``/``)."""
        return self.base_url + path

    def route(self, path: str, *answers: AnswerSpec) -> str:
        """Script ``path`` (any method): answers in order, the last repeating (default: 200 SUCCESS).

        Returns the route's full URL.
        """
        with self._cond:
            self._routes[path] = list(answers) or [200]
            self._used[path] = 0
        return self.url(path)

    # -- recorded calls ----------------------------------------------------------------------

    def calls(self, path: Optional[str] = None) -> list[Call]:
        """Calls received so far (to ``path`` only, when given), in arrival order."""
        with self._cond:
            return [c for c in self._calls if path is None or c.path == path]

    def wait_calls(self, count: int, path: Optional[str] = None, timeout: float = 10.0) -> list[Call]:
        """Wait until at least ``count`` calls (to ``path``) arrived; TimeoutError otherwise."""

        def enough() -> bool:
            return sum(1 for c in self._calls if path is None or c.path == path) >= count

        with self._cond:
            if not self._cond.wait_for(enough, timeout):
                raise TimeoutError(f"fewer than {count} calls to {path or 'the service'} after {timeout} s")
        return self.calls(path)

    def clear(self) -> None:
        """Forget recorded calls and restart every route's answer sequence."""
        with self._cond:
            self._calls.clear()
            self._used = dict.fromkeys(self._routes, 0)

    def close(self) -> None:
        """Stop the server and close its connections."""
        self._server.stop()

    def __enter__(self) -> BranchService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
