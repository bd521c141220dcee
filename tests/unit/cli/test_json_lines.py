"""tracer watch --json: flags shared between reports are encoded once and spliced in, byte for byte
the line json.dumps would write."""

from __future__ import annotations

import json
from typing import Any

from pytracer.cli.watch import json_lines


def _plain(report: dict[str, Any]) -> str:
    return json.dumps(report, separators=(",", ":")) + "\n"


def test_lines_equal_plain_dumps_with_shared_flags() -> None:
    flags = [{"kind": "idle_established", "pid": 7, "detail": 'a "quoted" \\ \x00 detail', "extra": {}}]
    reports = [{"t": i, "flags": flags, "states": {"ESTABLISHED": i}, "z": [1, 2]} for i in range(3)]
    reports.append({"t": 3, "flags": [], "states": {}})
    reports.append({"t": 4, "states": {}})
    reports.append({"t": 5, "flags": list(flags) + [{"kind": "close_wait", "extra": {"x": 1}}]})
    assert list(json_lines(reports)) == [_plain(r) for r in reports]


def test_shared_flags_are_encoded_once(monkeypatch: Any) -> None:
    import pytracer.cli.watch as w

    calls: list[int] = []
    real = json.dumps

    def counting(obj: Any, **kw: Any) -> str:
        if isinstance(obj, list):
            calls.append(len(obj))
        return real(obj, **kw)

    monkeypatch.setattr(w.json, "dumps", counting)
    flags = [{"kind": "close_wait", "n": i} for i in range(50)]
    lines = list(json_lines({"t": i, "flags": flags} for i in range(10)))
    assert calls == [50]
    assert all(json.loads(x)["flags"] == flags for x in lines)
