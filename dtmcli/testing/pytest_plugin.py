"""pytest plugin (placeholder until the coordinator lands): ``--dtm-server URL`` option."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--dtm-server URL`` (also read from ``DTM_SERVER``)."""
    parser.addoption(
        "--dtm-server",
        default=os.environ.get("DTM_SERVER", ""),
        help="run end-to-end tests against this real DTM server (e.g. http://localhost:36789/api/dtmsvr)",
    )
