"""Every ```python block of README.md runs (issue 9.15), so the README cannot drift from the code.

Blocks run against the embedded coordinator (``dtmcli.testing.DtmTestServer``) and a
``BranchService`` that answers SUCCESS on every path: before a block runs, the README's example
addresses ``http://localhost:36789/api/dtmsvr`` (DTM) and ``http://localhost:8081/api/busi``
(branch services) are replaced by theirs. After a group of blocks, every transaction it created
must have succeeded.

A block may be preceded, on the line just before its opening fence, by a marker comment that
GitHub does not render::

    <!-- readme: in usage, needs mysql -->

- ``in NAME``: blocks with the same NAME run in order in one namespace, so a later block uses the
  names an earlier one defined (``DTM``, ``busi``, ``saga`` ...). Blocks without it run alone.
- ``needs mysql`` / ``needs postgres`` / ``needs redis``: the block uses that local service (see
  tests/services.py: skipped when unreachable, failing under ``CI=true``).

A block with a top-level ``await`` (the asyncio examples) runs in its own ``asyncio.run``.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from services import require

from dtmcli import DtmClient
from dtmcli.testing import BranchService, DtmTestServer

README = Path(__file__).resolve().parents[1] / "README.md"
README_DTM = "http://localhost:36789/api/dtmsvr"
README_BUSI = "http://localhost:8081/api/busi"
SERVICES = {"mysql", "postgres", "redis"}
MARKER = re.compile(r"^<!--\s*readme:\s*(.*?)\s*-->$")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    session: str = ""
    needs: set[str] = field(default_factory=set)


def parse_marker(text: str, line: int) -> tuple[str, set[str]]:
    session, needs = "", set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        word, _, arg = part.partition(" ")
        if word == "in" and arg:
            session = arg.strip()
        elif word == "needs" and arg.strip() in SERVICES:
            needs.add(arg.strip())
        else:
            raise ValueError(f"README.md:{line}: unknown readme marker {part!r}")
    return session, needs


def parse(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        start = i
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        session, needs = parse_marker(marker.group(1), i) if marker else ("", set())
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start + 1}: unclosed ```python block")
        blocks.append(Block(start + 1, "\n".join(body) + "\n", session, needs))
        i += 1
    return blocks


def groups(blocks: list[Block]) -> dict[str, list[Block]]:
    """Blocks by namespace, in README order; a block without ``in NAME`` is its own group."""
    out: dict[str, list[Block]] = {}
    for b in blocks:
        key = b.session or f"line{b.line}"
        out.setdefault(key, []).append(b)
    return out


GROUPS = groups(parse(README.read_text(encoding="utf-8")))
if len(GROUPS) < 5:  # an unparsable README must not make this test vanish
    raise RuntimeError(f"expected the README's python blocks, found {len(GROUPS)} groups")


def test_marker_parsing() -> None:
    text = "x\n<!-- readme: in a, needs redis -->\n```python\nA = 1\n```\n```python\nB = 2\n```\n"
    a, b = parse(text)
    assert (a.line, a.code, a.session, a.needs) == (3, "A = 1\n", "a", {"redis"})
    assert (b.line, b.session, b.needs) == (6, "", set())
    with pytest.raises(ValueError, match="unknown readme marker 'needs dtm'"):
        parse("<!-- readme: needs dtm -->\n```python\n```\n")
    with pytest.raises(ValueError, match="unclosed"):
        parse("```python\nA = 1\n")


@pytest.mark.parametrize("name", list(GROUPS))
def test_readme_blocks_run(name: str) -> None:
    blocks = GROUPS[name]
    for service in sorted(set().union(*(b.needs for b in blocks))):
        require(service)
    with DtmTestServer() as server, BranchService() as busi:
        namespace: dict[str, Any] = {"__name__": f"readme_{name}"}
        for b in blocks:
            code = b.code.replace(README_DTM, server.url).replace(README_BUSI, f"{busi.base_url}/api/busi")
            compiled = compile(code, f"README.md:{b.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            if compiled.co_flags & inspect.CO_COROUTINE:
                asyncio.run(eval(compiled, namespace))
            else:
                exec(compiled, namespace)
        server.wait_idle()
        client = DtmClient(server.url)
        try:
            unfinished = {t.gid: t.status for t in client.iter_all() if t.status != "succeed"}
        finally:
            client.close()
        assert not unfinished, f"README block(s) left transactions not succeeded: {unfinished}"
