"""The BPF fd iterators against /proc, on real processes.

Holders run as real subprocesses: one with a listener, both ends of a
loopback connection, a UDP socket, a unix socket pair, a pipe and the fd of
a network namespace that nothing else keeps (its `ip netns` name is deleted
once the fd is open); its forked child shares all of that and opens a
socket of its own; a third process lives in a netns of its own (`unshare
--net`).  The ground truth is a plain ``os.readlink`` over /proc/PID/fd
of those pids, and ``stat`` of /proc/PID/ns/net.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import subprocess
import sys
from typing import Any, Iterator

import pytest

from pytracer.inventory import fdscan, owners, procs

from .conftest import fdinfo_ids, prog_ids_of

HOLDER = r"""
import json, os, signal, socket, sys
ns_path = sys.argv[1]
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(8)
cli = socket.create_connection(lst.getsockname()); srv, _ = lst.accept()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ux = socket.socketpair()
r, w = os.pipe()
nsfd = os.open(ns_path, os.O_RDONLY) if ns_path != "-" else None
child = os.fork()
if child == 0:
    own = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    while True:
        signal.pause()
print(json.dumps({"pids": [os.getpid(), child]}), flush=True)
sys.stdin.readline()
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
"""


NS_GET_NSTYPE = 0xB703  # include/uapi/linux/nsfs.h
CLONE_NEWNET = 0x40000000


def is_netns_fd(path: str) -> bool:
    """A network namespace's nsfs file?  Its link reads "net:[N]" when it
    was opened through /proc/PID/ns/net, but the mount path (or "/", once
    `ip netns del` detached it) when opened through an `ip netns` bind mount;
    so ask nsfs itself."""
    if os.stat(path).st_dev != os.stat("/proc/self/ns/net").st_dev:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    finally:
        os.close(fd)


def truth(pid: int) -> dict[str, Any]:
    """What /proc says about one process, by readlink."""
    base = f"/proc/{pid}/fd"
    socks, netns, n = set(), set(), 0
    for name in os.listdir(base):
        try:
            link = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue
        n += 1
        if m := re.fullmatch(r"socket:\[(\d+)\]", link):
            socks.add((int(m.group(1)), int(name)))
        elif is_netns_fd(f"{base}/{name}"):
            netns.add((os.stat(f"{base}/{name}").st_ino, int(name)))
    return {"sockets": socks, "netns_fds": netns, "fds": n, "netns": os.stat(f"/proc/{pid}/ns/net").st_ino}


def seen(scan: procs.FdScan, pid: int) -> dict[str, Any]:
    """The same facts about one process, from a scan."""
    socks = {(int(i), int(f)) for i, p, f in zip(scan.sockets.inodes, scan.sockets.pids, scan.sockets.fds)
             if p == pid}
    return {"sockets": socks, "fds": scan.fd_counts.get(pid), "netns": scan.netns_of.get(pid)}


@pytest.fixture
def holders() -> Iterator[list[int]]:
    name = f"ptfd{os.getpid() % 10000}{random.randint(100, 999)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    started: list[subprocess.Popen] = []
    try:
        a = subprocess.Popen([sys.executable, "-c", HOLDER, f"/run/netns/{name}"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        started.append(a)
        pids = json.loads(a.stdout.readline())["pids"]
        # Only the holder's fd keeps that namespace now.
        subprocess.run(["ip", "netns", "del", name], check=True, timeout=20)
        b = subprocess.Popen(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1" -',
                              sys.executable, HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(b)
        pids += json.loads(b.stdout.readline())["pids"]
        yield pids
    finally:
        for p in started:
            try:
                p.stdin.close()
                p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def test_iterators_agree_with_readlink_over_proc(holders: list[int]) -> None:
    parent, child, isolated, _ = holders
    before_progs, before_links = prog_ids_of(os.getpid()), fdinfo_ids(os.getpid(), "link_id")
    with fdscan.FdIterators() as it:
        assert len(prog_ids_of(os.getpid()) - before_progs) == 2
        assert len(fdinfo_ids(os.getpid(), "link_id") - before_links) == 2
        only = it.scan(holders)
        whole = it.scan()
    for pid in holders:
        want = truth(pid)
        for scan in (only, whole):
            got = seen(scan, pid)
            assert got["sockets"] == want["sockets"], pid
            assert got["fds"] == want["fds"], pid
            assert got["netns"] == want["netns"], pid
    # The forked child shares the parent's sockets (same inodes, same fds)
    # and has one of its own; the unshared process is in another netns.
    shared = {i for i, _ in truth(parent)["sockets"]} & {i for i, _ in truth(child)["sockets"]}
    assert len(shared) == 6  # listener, both ends, udp, the unix pair
    for ino in shared:
        assert [p for p, _ in only.sockets[ino]] == sorted([parent, child])
    assert only.netns_of[isolated] != only.netns_of[parent]
    # The netns held only by an fd (in both parent and child: the lowest holds it).
    (held_ino, held_fd), = truth(parent)["netns_fds"]
    assert only.netns_fds == {held_ino: f"/proc/{parent}/fd/{held_fd}"}
    assert whole.netns_fds[held_ino] == f"/proc/{parent}/fd/{held_fd}"
    refs = {r.ino for r in procs.netns_refs(whole)}
    assert {held_ino, only.netns_of[isolated]} <= refs
    assert (only.processes, only.truncated, only.unreadable) == (4, False, 0)
    # Nothing of the iterators is left once closed.
    assert prog_ids_of(os.getpid()) == before_progs
    assert fdinfo_ids(os.getpid(), "link_id") == before_links


def test_scan_fds_uses_the_iterators_and_matches_the_walk(holders: list[int]) -> None:
    assert fdscan.method()[0] == "bpf", fdscan.method()[1]
    it = owners.scan_fds(holders)
    walked = procs.walk_fds(holders)
    assert dict(it.sockets.items()) == dict(walked.sockets.items())
    assert it.fd_counts == walked.fd_counts
    assert it.netns_of == walked.netns_of
    # The walk reads links, and this netns fd's link is "/" (see is_netns_fd):
    # only the iterators find it.
    (held_ino, held_fd), = truth(holders[0])["netns_fds"]
    assert it.netns_fds == {held_ino: f"/proc/{holders[0]}/fd/{held_fd}"} and walked.netns_fds == {}
    bounded = owners.scan_fds(holders, max_fds=3)
    assert bounded.truncated and bounded.fds == 3 and bounded.processes == 1


def test_forced_proc_walk(holders: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    fdscan.close_shared()
    monkeypatch.setenv("PYTRACER_FDSCAN", "proc")
    try:
        assert fdscan.method() == ("proc", "PYTRACER_FDSCAN=proc")
        assert owners.scan_fds(holders).fd_counts == procs.walk_fds(holders).fd_counts
    finally:
        fdscan.close_shared()
