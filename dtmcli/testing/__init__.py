"""Test helpers: the in-process DTM-compatible coordinator and the pytest plugin."""
