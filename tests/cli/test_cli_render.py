"""Pure parts of the command line: durations, tables, watch's change lines, confirmation."""

from __future__ import annotations

import pytest

from dtmcli._models import Transaction
from dtmcli.cli._admin import confirmed
from dtmcli.cli._query import since_to_ms, watch_exit_code
from dtmcli.cli._render import changes, list_table, parse_since, table, transaction_text


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("1.5h", 5400),
                                               ("2d", 172800), ("1w", 604800), (" 3 m ", 180)])
def test_parse_since(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1y", "-1h", "0", "0s", "1h30m", "1e9"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text)


def test_since_to_ms() -> None:
    assert since_to_ms(None, 1000.0) is None
    assert since_to_ms(3600, 1_700_000_000.5) == 1_699_996_400_500
    assert since_to_ms(10**12, 5.0) == 0


def trans(status: str, branches: list[tuple[str, str, str]], reason: str = "") -> Transaction:
    return Transaction.from_json(
        {"gid": "g1", "trans_type": "saga", "status": status, "rollback_reason": reason},
        [{"branch_id": b, "op": op, "status": s, "url": f"http://busi/{b}{op}"} for b, op, s in branches],
    )


def test_table_aligns_and_fills_empty_cells() -> None:
    assert table(("A", "LONGER"), [("xyz", None), ("", "1")]) == "A    LONGER\nxyz  -\n-    1\n"


def test_stored_text_cannot_break_the_layout() -> None:
    t = trans("failed", [("01", "action", "failed")], reason="boom\nBRANCH  fake row\x1b[31m")
    text = transaction_text(t)
    assert "boom BRANCH  fake row [31m" in text and "\x1b" not in text
    assert len(list_table([t]).splitlines()) == 2


def test_changes_reports_only_what_changed() -> None:
    first = trans("submitted", [("01", "action", "prepared"), ("01", "compensate", "prepared")])
    assert changes(None, first) == [
        "transaction g1: submitted",
        "  branch 01 action: prepared  http://busi/01action",
        "  branch 01 compensate: prepared  http://busi/01compensate",
    ]
    assert changes(first, first) == []
    done = trans("submitted", [("01", "action", "succeed"), ("01", "compensate", "prepared")])
    assert changes(first, done) == ["  branch 01 action: succeed  http://busi/01action"]
    failed = trans("failed", [("01", "action", "succeed"), ("01", "compensate", "prepared")], reason="no stock")
    assert changes(done, failed) == ["transaction g1: failed (no stock)"]


def test_watch_exit_code() -> None:
    assert watch_exit_code(trans("succeed", [])) == 0
    assert watch_exit_code(trans("failed", [])) == 1
    assert watch_exit_code(trans("aborting", [])) is None


def test_confirmation() -> None:
    assert confirmed(True, False, None) is True
    assert confirmed(False, False, "y\n") is None  # no terminal: refuse, whatever was piped in
    assert confirmed(False, True, "y\n") is True and confirmed(False, True, "YES") is True
    assert confirmed(False, True, "\n") is False and confirmed(False, True, "") is False
