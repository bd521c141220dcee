"""The capability table of docs/privileges.md, parsed: the one statement of
what the deploy files grant (tests/unit/exporter/test_deploy.py) and of
what the capability-only runs get (tests/kernel/test_privileges.py)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "privileges.md"


def documented_capabilities(doc: Path = DOC) -> dict[str, bool]:
    """Capability -> granted by the deploy files (the table's last column)."""
    out: dict[str, bool] = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"CAP_[A-Z_]+", cells[0]):
            if cells[-1] not in ("yes", "no"):
                raise ValueError(f"{doc}: {cells[0]}: the last column must be yes or no, not {cells[-1]!r}")
            out[cells[0]] = cells[-1] == "yes"
    if not out:
        raise ValueError(f"{doc}: no capability table found")
    return out


def granted() -> set[str]:
    return {cap for cap, yes in documented_capabilities().items() if yes}
