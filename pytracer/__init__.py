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
    "Tracer": "kernel.core:Tracer",
    "TracerError": "kernel.hooks:TracerError",
    "BccTracer": "kernel.bcc:BccTracer",
    "BpfObject": "kernel.libbpf:BpfObject",
    "LibbpfError": "kernel.libbpf:LibbpfError",
    "tune_malloc": "kernel.environment:tune_malloc",
    "snapshot": "table.poll:snapshot",
    "Snapshot": "table.poll:Snapshot",
    "SockBuffers": "table.reads:SockBuffers",
    "seed": "inventory.seed:seed",
    "SeedResult": "table.writer:SeedResult",
    "Scanner": "leaks.scanner:Scanner",
    "LeakReport": "leaks.scanner:LeakReport",
    "watch_enricher": "leaks.cadence:watch_enricher",
    "Thresholds": "leaks.thresholds:Thresholds",
    "scan_fds": "inventory.owners:scan_fds",
    "ReportOptions": "views.model:ReportOptions",
    "build_report": "views.model:build_report",
    "ViewReducer": "views.model:ViewReducer",
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
