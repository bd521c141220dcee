"""The fdscan record parser: iterator records -> the FdScan a /proc walk gives.

The records are written by hand from the same fixture /proc tree that
tests/unit/inventory/test_procs.py walks, so both paths must agree on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pytracer.inventory import fdscan, owners, procs

from .test_procs import make_proc

T, S, N, OTHER = fdscan.KIND_TASK, fdscan.KIND_SOCKET, fdscan.KIND_NETNS, fdscan.KIND_OTHER


def recs(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    a = np.zeros(len(rows), fdscan.FD_REC_DTYPE)
    for i, (tgid, fd, ino, kind) in enumerate(rows):
        a[i] = (tgid, fd, ino, kind, 0)
    return a


# What the kernel would report for make_proc()'s tree: 4242 holds /dev/null
# (0), sockets 555 (3) and 556 (4) and a netns fd (7); 77 holds 555 (9).
TASKS = recs([(77, -1, 4026531992, T), (4242, -1, 4026531992, T)])
FILES = recs([(77, 9, 555, S), (4242, 0, 0, OTHER), (4242, 3, 555, S), (4242, 4, 556, S), (4242, 7, 4026532000, N)])


def test_layout_matches_bpf_header() -> None:
    header = (Path(__file__).resolve().parents[3] / "bpf" / "fdscan.h").read_text()
    body = re.search(r"struct pt_fd_rec \{(.*?)\};", header, re.S).group(1)
    names = re.findall(r"__[us](\d+) (\w+);", body)
    assert [n for _, n in names] == list(fdscan.FD_REC_DTYPE.names)
    assert [int(b) // 8 for b, _ in names] == [fdscan.FD_REC_DTYPE[n].itemsize for _, n in names]
    assert fdscan.FD_REC_DTYPE.itemsize == 24
    for const, value in (("PT_FD_TASK", T), ("PT_FD_SOCKET", S), ("PT_FD_NETNS", N), ("PT_FD_OTHER", OTHER)):
        assert re.search(rf"#define {const}\s+{value}\b", header)


def test_parse_equals_the_walk_of_the_same_tree(tmp_path: Path) -> None:
    root = str(make_proc(tmp_path))
    walked = procs.walk_fds(proc=root)
    parsed = fdscan.parse(TASKS, FILES, proc=root)
    assert dict(parsed.sockets.items()) == dict(walked.sockets.items()) == {555: [(77, 9), (4242, 3)],
                                                                            556: [(4242, 4)]}
    assert parsed.fd_counts == walked.fd_counts == {77: 1, 4242: 4}
    assert parsed.netns_fds == walked.netns_fds == {4026532000: f"{root}/4242/fd/7"}
    assert (parsed.processes, parsed.fds, parsed.truncated, parsed.unreadable) == (2, 5, False, 0)
    assert parsed.netns_of == {77: 4026531992, 4242: 4026531992}
    only = fdscan.parse(TASKS, FILES, only=[4242], proc=root)
    assert dict(only.sockets.items()) == {555: [(4242, 3)], 556: [(4242, 4)]}
    assert only.fd_counts == {4242: 4} and only.netns_of == {4242: 4026531992}


def test_parse_orders_and_bounds_like_the_walk(tmp_path: Path) -> None:
    root = str(make_proc(tmp_path))
    shuffled = FILES[[4, 2, 0, 3, 1]]
    for max_fds in range(0, 7):
        walked = procs.walk_fds(proc=root, max_fds=max_fds)
        parsed = fdscan.parse(TASKS, shuffled, proc=root, max_fds=max_fds)
        assert (parsed.fds, parsed.truncated) == (walked.fds, walked.truncated), max_fds
        assert parsed.fd_counts == walked.fd_counts, max_fds
        assert parsed.processes == walked.processes, max_fds
        # Which fds of a process cut in two are kept follows the directory's
        # order: ascending in the real /proc, arbitrary in a fixture tree.
        if max_fds in (0, 1, 5, 6):
            assert dict(parsed.sockets.items()) == dict(walked.sockets.items()), max_fds
    cut = fdscan.parse(TASKS, shuffled, proc=root, max_fds=3)
    assert dict(cut.sockets.items()) == {555: [(77, 9), (4242, 3)]}  # 77's 9, then 4242's 0 and 3


def test_processes_without_files_and_zombies() -> None:
    # A kernel thread (no files), a zombie (no nsproxy: netns 0), a process
    # whose task record came after its files were read (no task record).
    tasks = recs([(2, -1, 4026531992, T), (9, -1, 0, T)])
    files = recs([(30, 1, 700, S)])
    out = fdscan.parse(tasks, files)
    assert out.fd_counts == {2: 0, 9: 0, 30: 1}
    assert out.netns_of == {2: 4026531992}
    assert out.processes == 3 and dict(out.sockets.items()) == {700: [(30, 1)]}


def test_merge_adds_a_walked_process(tmp_path: Path) -> None:
    root = str(make_proc(tmp_path))
    out = fdscan.parse(TASKS[:1], FILES[:1], proc=root)  # only 77 reported
    fdscan.merge(out, procs.walk_fds([4242], proc=root))
    walked = procs.walk_fds(proc=root)
    assert dict(out.sockets.items()) == dict(walked.sockets.items())
    assert out.fd_counts == walked.fd_counts and out.netns_fds == walked.netns_fds
    assert (out.processes, out.fds) == (walked.processes, walked.fds)


def test_scan_fds_on_a_fixture_tree_never_uses_bpf(tmp_path: Path, monkeypatch) -> None:
    def boom() -> None:
        raise AssertionError("the iterators are for the host's /proc only")

    monkeypatch.setattr(fdscan, "shared", boom)
    root = str(make_proc(tmp_path))
    assert owners.scan_fds(proc=root).fds == 5


def test_runs_of_an_ascending_array_are_its_distinct_values_and_counts() -> None:
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 50, 1000):
        values = np.sort(rng.integers(1, 40, n).astype(np.uint32))
        got, counts = fdscan._runs(values)
        want, want_counts = np.unique(values, return_counts=True)
        assert got.tolist() == want.tolist() and counts.tolist() == want_counts.tolist()
        assert got.dtype == values.dtype
