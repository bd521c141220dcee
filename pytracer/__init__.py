"""pytracer: the kernel's TCP socket lifecycle, traced with eBPF.

The names below are the public Python API, the one the benchmarks and other
programs may call; everything else is internal and may move.  They resolve on
first use, so ``import pytracer`` itself loads nothing (no numpy, no libbpf).

    import pytracer
    with pytracer.Tracer(max_sockets=65536) as t:
        pytracer.seed(t)
        snap = pytracer.snapshot(t)
        report = pytracer.build_report(snap, None, pytracer.ReportOptions(top=10))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute" (relative to this package)
_PUBLIC = {
    "Tracer": "loader:Tracer",
    "TracerError": "loader:TracerError",
    "BccTracer": "bcc_backend:BccTracer",
    "BpfObject": "libbpf:BpfObject",
    "LibbpfError": "libbpf:LibbpfError",
    "tune_malloc": "environment:tune_malloc",
    "snapshot": "poller:snapshot",
    "Snapshot": "poller:Snapshot",
    "SockBuffers": "poller:SockBuffers",
    "seed": "leaks:seed",
    "SeedResult": "leaks:SeedResult",
    "Scanner": "leaks:Scanner",
    "LeakReport": "leaks:LeakReport",
    "watch_enricher": "leaks:watch_enricher",
    "Thresholds": "thresholds:Thresholds",
    "scan_fds": "procs:scan_fds",
    "ReportOptions": "model:ReportOptions",
    "build_report": "model:build_report",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _PUBLIC[name].split(":")
    except KeyError:
        raise AttributeError(f"module 'pytracer' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
