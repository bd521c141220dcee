"""Read the process tree a tracer follows (``tracer run``).

With ``follow_forks`` the kernel keeps the tree itself: a forked child
joins the "owners" pid filter and an exited process leaves it, and the
"tree" map counts both, and the children the full filter turned away
(struct pt_tree in pytracer.h).  :func:`read_tree` reads what it holds now.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import numpy as np

from pytracer.kernel import abi
from pytracer.table.reads import MapSource


@dataclass
class Tree:
    """The process tree a tracer follows (``tracer run``): the tgids in the
    "owners" filter now, and the kernel's counts from the "tree" map."""

    pids: tuple[int, ...]
    followed: int  # forks whose child joined the filter
    exited: int  # processes that left it when their last thread exited
    full: int  # children not followed: the filter was full

    def to_json(self) -> dict[str, int]:
        return {"alive": len(self.pids), "followed": self.followed, "exited": self.exited,
                "not_followed_filter_full": self.full}


def read_tree(src: MapSource) -> Tree:
    """One batch read of "owners" and one lookup of "tree"."""
    keys, _, n = src.map("owners").dump(1)
    pids = tuple(sorted(np.frombuffer(keys, dtype=np.uint32, count=n).tolist()))
    raw = src.map("tree").lookup(struct.pack("=I", 0), ctypes.sizeof(abi.PtTree))
    t = abi.PtTree.from_buffer_copy(raw) if raw is not None else abi.PtTree()
    return Tree(pids, int(t.followed), int(t.exited), int(t.full))
