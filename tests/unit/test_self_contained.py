"""The test suite reads nothing outside the repository (issue 9.13): a clean clone runs on its own."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
CHAIN = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parents\[\d+\]|\.parent\b)+)")
STEP = re.compile(r"\.parents\[(\d+)\]|\.parent\b")
OUTSIDE = re.compile(r"""["'](?:\.\./|[^"']*/\.\./)|shared/(?:traces|protocol)""")


def test_no_test_file_reaches_outside_the_repository() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        depth = len(path.relative_to(ROOT).parts)  # this many levels up from the file is the repository root
        for chain in CHAIN.findall(text):
            levels = sum(int(n) + 1 if n else 1 for n in STEP.findall(chain))
            if levels > depth:
                offenders.append(f"{path.relative_to(ROOT)}: Path(__file__){chain}")
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in OUTSIDE.finditer(text)
                      if path.name != Path(__file__).name]
    assert not offenders, offenders


def test_recorded_traces_and_protocol_are_in_the_repository() -> None:
    assert len(list((TESTS / "data" / "traces").glob("*.json"))) >= 40
    assert (TESTS / "data" / "traces" / "README.md").is_file()
    assert (ROOT / "docs" / "protocol.md").is_file()
