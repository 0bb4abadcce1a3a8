"""Shared test configuration. ``--dtm-server`` and the ``dtm`` fixtures come from the dtmcli pytest plugin."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# ``responses`` pins wire bodies by patching requests, so tests default to the requests transport;
# tests/unit/test_transport.py checks that the urllib3 transport puts the same bytes on the wire.
os.environ.setdefault("DTMCLI_TRANSPORT", "requests")

# Make ``tests/services.py`` importable as ``services`` from every test package.
sys.path.insert(0, str(Path(__file__).parent))

# The plugin is opt-in (it is not auto-loaded by installing dtmcli); this is the line users add too.
pytest_plugins = ["dtmcli.testing.pytest_plugin"]
