"""/proc readers on a fixture tree (no root, no real processes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pytracer.inventory import procs
from pytracer.inventory.owners import scan_fds

LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            64                   1048576              files
Max locked memory         8388608              8388608              bytes
"""


def make_proc(root: Path) -> Path:
    p = root / "4242"
    (p / "fd").mkdir(parents=True)
    (p / "comm").write_text("leaky srv\n")
    (p / "cmdline").write_bytes(b"python3\0server.py\0--port\x008080\0")
    (p / "limits").write_text(LIMITS)
    (p / "cgroup").write_text(
        "0::/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n"
    )
    # comm with a space and a parenthesis; starttime is field 22.
    fields = ["S"] + [str(i) for i in range(4, 22)] + ["987654"] + ["0"] * 10
    (p / "stat").write_text("4242 (leaky) srv) " + " ".join(fields) + "\n")
    os.symlink("socket:[555]", p / "fd" / "3")
    os.symlink("socket:[556]", p / "fd" / "4")
    os.symlink("/dev/null", p / "fd" / "0")
    os.symlink("net:[4026532000]", p / "fd" / "7")
    q = root / "77"
    (q / "fd").mkdir(parents=True)
    os.symlink("socket:[555]", q / "fd" / "9")  # shared after fork
    (q / "limits").write_text(LIMITS.replace("64                   1048576", "unlimited            unlimited"))
    (root / "not-a-pid").mkdir()
    return root


def test_facts(tmp_path: Path) -> None:
    root = str(make_proc(tmp_path))
    f = procs.facts(4242, root)
    assert f.comm == "leaky srv"
    assert f.cmdline == "python3 server.py --port 8080"
    assert f.cgroup.startswith("/system.slice/docker-0123")
    assert f.container == "0123456789ab"
    assert (f.open_fds, f.max_fds, f.start_ticks) == (4, 64, 987654)
    assert procs.nofile_limit(77, root) is None  # unlimited
    assert procs.comm(99999, root) is None  # gone


def test_scan_fds_maps_inodes_to_every_holder(tmp_path: Path) -> None:
    root = str(make_proc(tmp_path))
    scan = scan_fds(proc=root)
    assert scan.sockets == {555: [(77, 9), (4242, 3)], 556: [(4242, 4)]}
    assert scan.fd_counts == {77: 1, 4242: 4}
    assert scan.netns_fds == {4026532000: f"{root}/4242/fd/7"}
    only = scan_fds([4242], proc=root)
    assert only.sockets == {555: [(4242, 3)], 556: [(4242, 4)]}


def test_scan_fds_is_bounded(tmp_path: Path) -> None:
    root = str(make_proc(tmp_path))
    scan = scan_fds(proc=root, max_fds=2)
    assert scan.truncated and scan.fds == 2


def test_cgroup_v1_and_no_container() -> None:
    assert procs.container_id("/user.slice/user-0.slice/session-1.scope") is None
    assert procs.container_id("/kubepods/besteffort/pod1/" + "a" * 64) == "a" * 12


def test_socket_owners_bulk_questions() -> None:
    owners = procs.SocketOwners([556, 555, 555, 557], [4242, 4242, 77, 77], [4, 3, 9, 1])
    pid, fd = owners.first(np.array([555, 556, 0, 999], np.uint64))
    assert pid.tolist() == [77, 4242, 0, 0] and fd.tolist() == [9, 4, -1, -1]
    assert owners.held_by([4242]).tolist() == [555, 556]
    pid, held = owners.held_counts(np.array([555], np.uint64))
    assert list(zip(pid.tolist(), held.tolist())) == [(77, 1), (4242, 1)]
    assert owners.get(999) is None and dict(owners)[557] == [(77, 1)]


@pytest.mark.parametrize("chunk", [8192, 1, 2])
def test_socket_owners_pairs_once_per_process(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "SEARCH_CHUNK", chunk)
    # 555: pid 77 twice (a dup'd fd), pid 4242 once; 556: pid 4242 twice; 557 not asked.
    owners = procs.SocketOwners([555, 555, 555, 556, 556, 557], [77, 4242, 77, 4242, 4242, 9], [3, 5, 8, 1, 2, 4])
    # Pairs (555, 77), (555, 4242), (556, 4242): 77 holds one socket, 4242 two.
    pid, held = owners.held_counts(np.array([556, 555, 999], np.uint32))
    assert list(zip(pid.tolist(), held.tolist())) == [(77, 1), (4242, 2)]
    assert [len(a) for a in procs.SocketOwners().held_counts(np.array([1], np.uint64))] == [0, 0]
    assert owners.holder_pids(np.array([556, 999], np.uint64)).tolist() == [4242]
    assert owners.holder_pids(np.array([555, 557], np.uint64)).tolist() == [9, 77, 4242]
    # get_many answers as get(ino, []) does, one inode at a time.
    asked = [557, 0, 555, 999, 556]
    assert owners.get_many(np.array(asked, np.uint64)) == [owners.get(i, []) for i in asked]
    assert owners.get_many([555]) == [[(77, 3), (77, 8), (4242, 5)]]
    assert procs.SocketOwners().get_many([1, 2]) == [[], []]


def test_socket_owners_one_holder_each_keep_no_spans_and_answer_alike() -> None:
    # One holder per inode: no per-inode start and count arrays are kept, and every question
    # is answered as with a second holder on an unrelated inode (the general path).
    inodes, pids, fds = [556, 555, 557, 560], [4242, 77, 77, 9], [4, 3, 1, 7]
    single = procs.SocketOwners(inodes, pids, fds)
    shared = procs.SocketOwners([*inodes, 999, 999], [*pids, 5, 6], [*fds, 6, 6])
    assert single._start is None and single._count is None and shared._count is not None
    asked = np.array([557, 0, 555, 998, 556, 560], np.uint64)
    for q in (lambda o: o.first(asked), lambda o: o.held_counts(asked), lambda o: (o.holder_pids(asked),)):
        assert [a.tolist() for a in q(single)] == [a.tolist() for a in q(shared)]
    assert single.first(asked)[0].tolist() == [77, 0, 77, 0, 4242, 9]
    assert single.get_many(asked) == shared.get_many(asked) == [[(77, 1)], [], [(77, 3)], [], [(4242, 4)], [(9, 7)]]
    assert single.held_by([77]).tolist() == [555, 557] and single[560] == [(9, 7)] and 998 not in single
    assert sorted(single) == [555, 556, 557, 560] and len(single) == 4
