"""docs/porting.md: every fxlens name a done / partly / extra row claims exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "porting.md"
CLAIMED = ("done", "partly", "extra")


def rows() -> list[tuple[str, list[str], str]]:
    out = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2] in (*CLAIMED, "no", "lead"):
            out.append((cells[0], re.findall(r"`(fxlens[\w.]*)`", cells[1]), cells[2]))
    return out


def resolve(path: str):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def test_doc_has_rows_for_every_section():
    statuses = [s for _, _, s in rows()]
    assert len(statuses) > 50 and statuses.count("done") >= 40


@pytest.mark.parametrize("tl, names, status", [r for r in rows() if r[2] in CLAIMED], ids=lambda x: str(x)[:60])
def test_claimed_names_exist(tl, names, status):
    assert names, f"row {tl!r} is marked {status} but names no fxlens object"
    for name in names:
        obj = resolve(name)
        assert obj is not None or name.endswith("default_prepend_bos") or name.endswith("default_padding_side")
