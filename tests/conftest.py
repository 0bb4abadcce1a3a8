"""Shared test configuration. The ``--dtm-server`` option comes from the dtmcli pytest plugin."""

from __future__ import annotations

import sys
from pathlib import Path

# Make ``tests/services.py`` importable as ``services`` from every test package.
sys.path.insert(0, str(Path(__file__).parent))
