"""Property tests of the /proc readers (pytracer.inventory.procs, owners) on
fixture /proc trees: any bytes in status, limits, stat, cgroup and comm, any
fd link and name.  The readers answer None or the right value, and never
raise."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pytracer.inventory import procs
from pytracer.inventory.owners import scan_fds

pytestmark = pytest.mark.fuzz

PID = 4242
# A cgroup's directory name: any bytes but '/' and NUL, so also spaces, ':', '\r', '\x1c', U+2028, not UTF-8.
cgroup_names = st.binary(min_size=1, max_size=20).filter(lambda b: b"/" not in b and b"\0" not in b
                                                          and b"\n" not in b and b not in (b".", b".."))


def proc_with(files: dict[str, bytes]) -> tempfile.TemporaryDirectory:
    tmp = tempfile.TemporaryDirectory(prefix="ptfuzz-proc-")
    d = Path(tmp.name) / str(PID)
    (d / "fd").mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return tmp


@given(st.lists(cgroup_names, min_size=1, max_size=4), st.binary(max_size=80))
@example([b"a\x1cb"], b"")  # str.splitlines() cuts at \x1c, \x85, U+2028...: lines end at \n only
@example(["a\u2028b".encode()], b"")
@example([b"caf\xe9"], b"")  # not UTF-8
def test_cgroup_path_with_odd_characters(names: list[bytes], v1_noise: bytes) -> None:
    path = b"/" + b"/".join(names)
    v1 = b"12:cpu,cpuacct:/" + v1_noise.replace(b"\n", b"") + b"\n"
    with proc_with({"cgroup": v1 + b"0::" + path + b"\n"}) as root:
        assert procs.cgroup_raw(PID, root) == path
        assert procs.cgroup(PID, root) == path.decode(errors="replace")
        # ...and that path names the directory: cgroup_id is its inode.
        cg = Path(root) / "cgroupfs"
        target = os.path.join(os.fsencode(cg), path.lstrip(b"/"))
        os.makedirs(target)
        assert procs.cgroup_id(path, str(cg)) == os.stat(target).st_ino != 0


@given(st.binary(max_size=400))
def test_cgroup_of_any_bytes(raw: bytes) -> None:
    with proc_with({"cgroup": raw}) as root:
        got = procs.cgroup_raw(PID, root)
        assert got is None or (b"\n" not in got and got in raw)
        procs.container_id(procs.cgroup(PID, root))
        procs.cgroup_id(got, root)


LIMITS_HEAD = b"Limit                     Soft Limit           Hard Limit           Units     \n"


@given(st.one_of(st.integers(0, 1 << 63), st.just("unlimited")), st.binary(max_size=200))
@example(0, "Max open files ²".encode())  # str.isdigit() says yes, int() says no
@example(0, b"Max open files")
def test_nofile_limit(soft: int | str, noise: bytes) -> None:
    line = f"Max open files            {soft:<20} {soft:<20} files     \n".encode()
    with proc_with({"limits": LIMITS_HEAD + line}) as root:
        assert procs.nofile_limit(PID, root) == (None if soft == "unlimited" else soft)
    with proc_with({"limits": noise}) as root:
        got = procs.nofile_limit(PID, root)
        assert got is None or (isinstance(got, int) and got >= 0)


@given(st.integers(1, 1 << 22), st.binary(max_size=200))
@example(7, b"Tgid:\t\xb2\n")
def test_tgid_from_status(tgid: int, noise: bytes) -> None:
    status = b"Name:\tx\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t%d\nNgid:\t0\nPid:\t%d\n" % (tgid, PID)
    with proc_with({"status": status}) as root:
        assert procs.tgid(PID, root) == tgid
    with proc_with({"status": noise}) as root:
        got = procs.tgid(PID, root)
        assert got is None or got >= 0


@given(st.text(max_size=30), st.integers(0, 1 << 62), st.binary(max_size=120))
def test_start_ticks_and_comm(comm: str, ticks: int, noise: bytes) -> None:
    # comm may hold spaces and ')' (the kernel does not escape it): field 22 counts from the last ')'.
    comm = comm.replace("\0", "")[:15]
    fields = [b"S"] + [b"%d" % i for i in range(4, 22)] + [b"%d" % ticks] + [b"0"] * 10
    stat = b"%d (" % PID + comm.encode() + b") " + b" ".join(fields) + b"\n"
    with proc_with({"stat": stat, "comm": comm.encode() + b"\n"}) as root:
        assert procs.start_ticks(PID, root) == ticks
        assert procs.comm(PID, root) == comm
    with proc_with({"stat": noise, "comm": noise, "cmdline": noise}) as root:
        got = procs.start_ticks(PID, root)
        assert got is None or isinstance(got, int)
        procs.comm(PID, root)
        procs.cmdline(PID, root)


fd_names = st.one_of(st.integers(0, 1 << 20).map(str), st.text("0123456789abc²٣", min_size=1, max_size=6))
fd_links = st.one_of(
    st.integers(0, (1 << 64) - 1).map(lambda i: f"socket:[{i}]"),
    st.integers(0, (1 << 64) - 1).map(lambda i: f"net:[{i}]"),
    st.text(max_size=24).filter(lambda t: "\0" not in t and t).map(lambda t: "socket:[" + t),
    st.sampled_from(["socket:[]", "socket:[12", "socket:[1]\n", "socket:[٣]", "net:[x]", "pipe:[7]", "/dev/null"]),
)


@given(st.dictionaries(fd_names, fd_links, max_size=8))
@example({"3": "socket:[1]\n"})  # a newline after the ']'
@example({"x": "socket:[5]"})  # an fd name that is not a number
@example({"3": "socket:[٣]"})  # a digit that is not ASCII
def test_fd_links_of_any_shape(fds: dict[str, str]) -> None:
    with proc_with({}) as root:
        fd_dir = Path(root) / str(PID) / "fd"
        for name, link in fds.items():
            os.symlink(link, fd_dir / name)
        scan = scan_fds(proc=root)
        want = {}
        for name, link in fds.items():
            if name.isascii() and name.isdigit() and link.startswith("socket:[") and link.endswith("]"):
                body = link[8:-1]
                if body.isascii() and body.isdigit() and len(body) <= 20 and int(body) < 1 << 64:
                    want.setdefault(int(body), []).append((PID, int(name)))
        assert {ino: sorted(v) for ino, v in scan.sockets.items()} == {ino: sorted(v) for ino, v in want.items()}
        assert scan.fd_counts == {PID: len(fds)}
