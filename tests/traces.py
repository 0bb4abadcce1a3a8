"""Loading the recorded DTM v1.19.0 exchanges in tests/data/traces (a copy kept in the repository)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

TRACES = Path(__file__).resolve().parent / "data" / "traces"
# The traces write every port as PORT; wire tests use this one instead.
PORT = "8081"
BUSI = f"http://127.0.0.1:{PORT}"
DTM = f"http://127.0.0.1:{PORT}/api/dtmsvr"


def with_port(obj: Any) -> Any:
    """``obj`` with every ``127.0.0.1:PORT`` (in keys, values and nested JSON text) made concrete."""
    return json.loads(json.dumps(obj).replace("127.0.0.1:PORT", f"127.0.0.1:{PORT}"))


def load(name: str) -> dict[str, Any]:
    """The trace ``name`` (without .json)."""
    with open(TRACES / f"{name}.json", encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def events(name: str, kind: str = "client->dtm", path_suffix: str = "") -> Iterator[dict[str, Any]]:
    """The events of one kind (optionally only those whose path ends with ``path_suffix``)."""
    for event in load(name)["events"]:
        if event["kind"] == kind and event["request"]["path"].endswith(path_suffix):
            yield event


def request_body(name: str, path_suffix: str, index: int = 0) -> Any:
    """The JSON body of the ``index``-th client->dtm request to ``path_suffix``."""
    return with_port(list(events(name, path_suffix=path_suffix))[index]["request"]["body"])
