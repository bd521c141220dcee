"""The soak, 3 minutes (CI): tests/kernel/soak.py at a steady 800 connections/s.

``make soak`` runs the full one (21 minutes, >= 2 million connections).
PYTRACER_SOAK_MINUTES stretches this one.
"""

from __future__ import annotations

import os
from pathlib import Path

from .soak import soak, verdicts

MINUTES = float(os.environ.get("PYTRACER_SOAK_MINUTES", "3"))
# The figures, for docs/reliability.md (not asserted on).
OUT = Path(os.environ.get("PYTRACER_RELIABILITY_DIR", "/tmp/pytracer-reliability")) / "soak-ci.json"


def test_soak_exact_flat_and_fast(capsys) -> None:  # noqa: ANN001 - pytest fixture
    OUT.parent.mkdir(parents=True, exist_ok=True)
    r = soak(MINUTES, churn_rate=600, ab_rate=200, out=OUT, log=lambda m: None)
    v = verdicts(r)
    summary = (f"{r['connections']:,} connections in {r['load_seconds']} s; opened {r['watch']['opened_total']:,} "
               f"(oracle {r['oracle']['opened']:,}, generators {r['generator']['opened_expected']:,}); "
               f"scrape p99 {r['scrape']['p99_ms']} ms; RSS {r['rss_kib']}; fds {r['fds']}; table {r['table']}")
    with capsys.disabled():
        print("\nsoak: " + summary)
    assert all(v.values()), ({k: ok for k, ok in v.items() if not ok}
                             | {"figures": summary, "oracle": r["oracle"]["counts"],
                                "oracle at its end (listeners, unclosed, destroyed open)": r["oracle"]["unclosed"]})
