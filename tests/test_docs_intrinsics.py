"""docs/intrinsics.md cannot go stale: its table lists exactly the intrinsics
the coordinator implements, and each row names a test that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "intrinsics.md"


def _rows() -> dict[str, str]:
    text = DOC.read_text()
    table = text.split("<!-- intrinsics-table -->")[1].split("<!-- /intrinsics-table -->")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rows[cells[0].strip("`")] = cells[2].strip("`")
    return rows


def test_table_lists_exactly_the_implemented_intrinsics() -> None:
    from tff_amqp.coordinator.stateful.strategy import supported_intrinsics

    assert sorted(_rows()) == supported_intrinsics()


def test_every_row_names_an_existing_test() -> None:
    for uri, test_id in _rows().items():
        match = re.fullmatch(r"(tests/[\w/]+\.py)::(\w+)(\[[\w-]+\])?", test_id)
        assert match, f"{uri}: 'tested by' is not a test id: {test_id!r}"
        path, function, parameter = match.groups()
        source = (ROOT / path).read_text()
        assert f"def {function}(" in source, f"{uri}: {path} has no {function}"
        if parameter:
            # A parametrized case: its id must appear as a parameter value.
            first = parameter.strip("[]").split("-")[0]
            assert f'"{first}"' in source, f"{uri}: {path} has no case {first!r}"
