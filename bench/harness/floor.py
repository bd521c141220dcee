#!/usr/bin/env python3
"""Attach the floor: empty tp_btf programs on the hooks pytracer's default
plan uses on this kernel (bench/harness/floor.bpf.c), through pytracer's own
libbpf binding.  Prints "ready" once attached and stays attached until
SIGINT, SIGTERM or EOF on stdin.

    python3 bench/harness/floor.py

The cost-of-watching benchmark runs it as the "floor" condition: what
attaching anything at all to those events costs, the part of a tracer's
cost no tracer can remove.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib import REPO, build_bpf  # noqa: E402

sys.path.insert(0, str(REPO))

import pytracer  # noqa: E402

PROGS = ("floor_state", "floor_reset")


def build() -> bytes:
    return build_bpf("floor")


@contextmanager
def attached() -> Iterator[dict[str, int]]:
    """The floor programs attached; yields name -> program id."""
    obj = pytracer.BpfObject(build(), "floor")
    links = []
    try:
        obj.load()
        links = [obj.program(p).attach() for p in PROGS]
        yield {p: obj.program(p).info().id for p in PROGS}
    finally:
        for link in links:
            link.destroy()
        obj.close()


def main() -> int:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    with attached():
        print("ready", flush=True)
        done.wait(3600)  # bounded: an hour at most
    return 0


if __name__ == "__main__":
    sys.exit(main())
