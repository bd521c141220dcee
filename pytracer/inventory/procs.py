"""/proc readers: who holds which socket, and how close each process is to its fd limit.

The kernel names a socket's owner only in the owner's context (accept,
connect); a socket that was inherited, passed over a unix socket, or created
before the tracer started has to be found the way ``ss -p`` finds it: by
walking ``/proc/PID/fd`` and matching ``socket:[INODE]`` links against the
inode that sock_diag reports.  This module does that walk, bounded, and reads
the per-process facts the leak detectors need:

* comm, cmdline, cgroup (v2 path, plus a container id when the path has one),
* open fd count and the RLIMIT_NOFILE soft limit (``/proc/PID/limits``),
* the process start time (field 22 of ``/proc/PID/stat``), so a history keyed
  by pid survives pid reuse,
* which network namespaces exist: every ``/proc/PID/ns/net``, every netns fd a
  process holds open (``net:[INO]`` links, e.g. container runtimes), and the
  bind mounts under ``/var/run/netns`` (``ip netns add``).

Every reader takes the ``/proc`` root as an argument, so unit tests point it
at a fixture tree.  On the host's /proc, :func:`pytracer.inventory.owners.scan_fds`
gets the same facts from BPF iterators when it can (:mod:`pytracer.inventory.fdscan`);
this module imports neither.  Processes
vanish while we read them; every reader treats ENOENT/ESRCH/EACCES as "gone"
and moves on.
"""

from __future__ import annotations

import logging
import os
import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from pytracer.arrays import find_sorted

log = logging.getLogger(__name__)

PROC = "/proc"
NETNS_RUN_DIRS = ("/var/run/netns", "/run/netns")
CGROUP2_ROOT = "/sys/fs/cgroup"

# Bounds: a scan never walks more than this many fds or processes.
MAX_FDS_TOTAL = 4_000_000
MAX_PROCESSES = 1_000_000

# fd links: "socket:[INODE]" (net/socket.c sockfs_dname), "net:[INODE]" (nsfs); matched whole.
_NET_LINK = re.compile(r"net:\[([0-9]{1,20})\]")
_SOCKET_LINK = re.compile(r"socket:\[([0-9]{1,20})\]")
# docker/containerd/cri-o/podman put a 64-hex id in the cgroup path.
# "Max open files            1024                 524288               files" (fs/proc/base.c proc_pid_limits)
_NOFILE = re.compile(rb"^Max open files[ \t]+([0-9]+)[ \t]", re.M)
_TGID = re.compile(rb"^Tgid:[ \t]*([0-9]+)[ \t]*$", re.M)
_CONTAINER_ID = re.compile(r"(?:^|[/-])(?:docker-|cri-containerd-|crio-|libpod-)?([0-9a-f]{64})(?:\.scope)?(?:/|$)")


@dataclass
class NetnsRef:
    """A network namespace we can enter: its inode and a path that opens it."""

    ino: int
    path: str  # /proc/PID/ns/net, /proc/PID/fd/N or /var/run/netns/NAME
    label: str  # "host", "netns NAME" or "pid N"


# Inodes a bulk question searches for at a time.
SEARCH_CHUNK = 8192


class SocketOwners(Mapping):
    """Socket inode -> [(pid, fd), ...] holding it, ascending.

    Kept as sorted numpy arrays rather than a dict of lists (over 200 bytes
    per socket): the (inode, pid, fd) entries and, where some inode has
    several, per distinct inode where its entries start and how many there
    are.  When each socket has one holder (the usual case) its inodes are
    the entries' own and its entry is its slot, so nothing else is kept:
    16 bytes per socket fd, 1.6 MB for a host with 100k sockets.  The
    questions callers ask in bulk (first holder of each inode, inodes some
    pids hold) are array operations.
    """

    def __init__(self, inodes: Iterable[int] | np.ndarray = (), pids: Iterable[int] | np.ndarray = (),
                 fds: Iterable[int] | np.ndarray = (), by_pid_fd: bool = False) -> None:
        """``by_pid_fd``: the input is already in (pid, fd) order, so a
        stable sort by inode alone gives (inode, pid, fd) order."""
        ino = np.asarray(inodes, dtype=np.uint64).reshape(-1)
        # pids and fds fit 32 bits (pid_max is at most 2^22, fds are ints).
        pid = np.asarray(pids, dtype=np.int32).reshape(-1)
        fd = np.asarray(fds, dtype=np.int32).reshape(-1)
        order = np.argsort(ino, kind="stable") if by_pid_fd else np.lexsort((fd, pid, ino))
        self.inodes, self.pids, self.fds = ino[order], pid[order], fd[order]
        del ino, pid, fd, order
        # Per distinct inode, its first entry and how many: None when each
        # inode has one holder (then slot i is entry i, see _spans).
        self._start: np.ndarray | None = None
        self._count: np.ndarray | None = None
        if len(self.inodes) < 2 or bool((self.inodes[1:] != self.inodes[:-1]).all()):
            self._keys = self.inodes  # one holder each: the inodes are already unique
        else:
            keys, start, count = np.unique(self.inodes, return_index=True, return_counts=True)
            self._keys, self._start, self._count = keys, start.astype(np.int32), count.astype(np.int32)

    def _spans(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first entry, number of entries) of each of the distinct inodes ``slots``."""
        if self._start is None or self._count is None:
            return slots, np.ones(len(slots), np.int32)
        return self._start[slots], self._count[slots]

    def _slot(self, ino: int) -> int:
        if ino < 0 or ino > 0xFFFFFFFFFFFFFFFF:
            return -1
        i = int(np.searchsorted(self._keys, np.uint64(ino)))
        return i if i < len(self._keys) and int(self._keys[i]) == ino else -1

    def __getitem__(self, ino: int) -> list[tuple[int, int]]:
        i = self._slot(int(ino))
        if i < 0:
            raise KeyError(ino)
        start, count = self._spans(np.array([i]))
        s, n = int(start[0]), int(count[0])
        return list(zip(self.pids[s : s + n].tolist(), self.fds[s : s + n].tolist()))

    def __contains__(self, ino: object) -> bool:
        return isinstance(ino, (int, np.integer)) and self._slot(int(ino)) >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys.tolist())

    def __len__(self) -> int:
        return len(self._keys)

    def first(self, inodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each inode: the lowest (pid, fd) holding it; (0, -1) if none."""
        inodes = np.asarray(inodes, dtype=np.uint64)
        pid = np.zeros(len(inodes), np.int64)
        fd = np.full(len(inodes), -1, np.int64)
        i, hit = find_sorted(self._keys, inodes)
        hit &= inodes != 0
        start = self._spans(i[hit])[0]
        pid[hit] = self.pids[start]
        fd[hit] = self.fds[start]
        return pid, fd

    def held_by(self, pids: Iterable[int]) -> np.ndarray:
        """Sorted unique inodes any of ``pids`` holds an fd for."""
        mask = np.isin(self.pids, np.asarray(list(pids), dtype=np.int64))
        return np.unique(self.inodes[mask])

    def _entries_of(self, inodes: np.ndarray) -> np.ndarray:
        """A mask over the (inode, pid, fd) entries: those of ``inodes``.
        Through the sorted unique inodes, with no sort of either side, and
        :data:`SEARCH_CHUNK` inodes at a time (a full scan asks of every
        socket: their positions are never all held, nor a 64-bit copy)."""
        wanted = np.zeros(len(self._keys), bool)
        for start in range(0, len(inodes), SEARCH_CHUNK):
            i, hit = find_sorted(self._keys, np.asarray(inodes[start : start + SEARCH_CHUNK], dtype=np.uint64))
            wanted[i[hit]] = True
        return wanted if self._count is None else np.repeat(wanted, self._count)

    def held_counts(self, inodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pid, how many of ``inodes`` it holds) for every pid holding any,
        pids ascending; a socket a process holds on several fds counts once."""
        keep = self._entries_of(inodes)
        # The arrays are in (inode, pid, fd) order: a pair's first fd.
        keep[1:] &= (self.inodes[1:] != self.inodes[:-1]) | (self.pids[1:] != self.pids[:-1])
        return np.unique(self.pids[keep], return_counts=True)

    def holder_pids(self, inodes: np.ndarray) -> np.ndarray:
        """Sorted unique pids holding any of ``inodes``."""
        return np.unique(self.pids[self._entries_of(inodes)])

    def get_many(self, inodes: Iterable[int]) -> list[list[tuple[int, int]]]:
        """``self.get(ino, [])`` for each inode, in one search."""
        inodes = np.asarray(list(inodes) if not isinstance(inodes, np.ndarray) else inodes, dtype=np.uint64)
        if not len(self._keys):
            return [[] for _ in range(len(inodes))]
        i, found = find_sorted(self._keys, inodes)
        start, count = self._spans(i)
        hit, start, count = found.tolist(), start.tolist(), count.tolist()
        pids, fds = self.pids, self.fds
        return [list(zip(pids[s : s + n].tolist(), fds[s : s + n].tolist())) if h else []
                for h, s, n in zip(hit, start, count)]


@dataclass
class FdScan:
    """The result of walking /proc/*/fd."""

    sockets: SocketOwners = field(default_factory=SocketOwners)  # inode -> [(pid, fd)]
    fd_counts: dict[int, int] = field(default_factory=dict)  # pid -> open fds
    netns_of: dict[int, int] = field(default_factory=dict)  # pid -> netns inode
    netns_fds: dict[int, str] = field(default_factory=dict)  # netns inode -> /proc/PID/fd/N holding it
    processes: int = 0
    fds: int = 0
    truncated: bool = False
    unreadable: int = 0  # processes whose fd table we could not read


@dataclass
class ProcFacts:
    pid: int
    comm: str | None = None
    cmdline: str | None = None
    cgroup: str | None = None
    container: str | None = None
    open_fds: int | None = None
    max_fds: int | None = None  # RLIMIT_NOFILE soft limit; None = unlimited/unknown
    start_ticks: int | None = None


def _read(path: str, limit: int = 1 << 16) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def pids(proc: str = PROC) -> list[int]:
    """Every process (tgid) visible in /proc, ascending."""
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())[:MAX_PROCESSES]


def comm(pid: int, proc: str = PROC) -> str | None:
    raw = _read(f"{proc}/{pid}/comm", 256)
    if raw is None:
        return None
    # The kernel adds one newline; a name may hold newlines of its own (prctl PR_SET_NAME).
    return (raw[:-1] if raw.endswith(b"\n") else raw).decode(errors="replace")


def cmdline(pid: int, proc: str = PROC, limit: int = 4096) -> str | None:
    raw = _read(f"{proc}/{pid}/cmdline", limit)
    if raw is None:
        return None
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return text or None  # kernel threads have an empty cmdline


def cgroup_raw(pid: int, proc: str = PROC) -> bytes | None:
    """The cgroup v2 path (``0::/...``), else the first v1 hierarchy's path, as
    the kernel wrote it: bytes, since a cgroup's name may be any bytes but
    '/' and NUL (not UTF-8, spaces, colons, form feeds...).  Lines end at
    '\n' only."""
    raw = _read(f"{proc}/{pid}/cgroup")
    if raw is None:
        return None
    first = None
    for line in raw.split(b"\n"):
        parts = line.split(b":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == b"0" and parts[1] == b"":
            return parts[2]
        if first is None:
            first = parts[2]
    return first


def cgroup(pid: int, proc: str = PROC) -> str | None:
    """:func:`cgroup_raw` for display (bytes that are not UTF-8 shown as U+FFFD)."""
    raw = cgroup_raw(pid, proc)
    return raw.decode(errors="replace") if raw is not None else None


def container_id(cgroup_path: str | None) -> str | None:
    """The 12-character container id a cgroup path names, if any."""
    if not cgroup_path:
        return None
    m = _CONTAINER_ID.search(cgroup_path)
    return m.group(1)[:12] if m else None


def cgroup_id(cgroup_path: str | bytes | None, root: str = CGROUP2_ROOT) -> int:
    """The cgroup v2 id (what bpf_get_current_cgroup_id() returns): the inode
    of the cgroup's directory in cgroupfs (kernfs node id on 64-bit).  Pass
    :func:`cgroup_raw`'s bytes: a name that is not UTF-8 has no str path."""
    if not cgroup_path:
        return 0
    path = os.fsencode(cgroup_path)
    try:
        return os.stat(os.path.join(os.fsencode(root), path.lstrip(b"/"))).st_ino
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return 0


def nofile_limit(pid: int, proc: str = PROC) -> int | None:
    """RLIMIT_NOFILE soft limit from /proc/PID/limits; None when unlimited or unreadable."""
    raw = _read(f"{proc}/{pid}/limits")
    if raw is None:
        return None
    m = _NOFILE.search(raw)
    return int(m.group(1)) if m else None


def tgid(pid: int, proc: str = PROC) -> int | None:
    """The process (thread group) a task id belongs to, from /proc/PID/status."""
    raw = _read(f"{proc}/{pid}/status")
    m = _TGID.search(raw) if raw is not None else None
    return int(m.group(1)) if m else None


def start_ticks(pid: int, proc: str = PROC) -> int | None:
    """Process start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    raw = _read(f"{proc}/{pid}/stat", 4096)
    if raw is None:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    tail = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(tail[19])  # fields 3.. start at tail[0]; field 22 is tail[19]
    except (IndexError, ValueError):
        return None


def count_fds(pid: int, proc: str = PROC) -> int | None:
    """Open fds of a process.  On the real /proc of v6.2+ one stat(2): the
    size of /proc/PID/fd is its number of open files (fs/proc/fd.c,
    proc_fd_getattr; 0 on older kernels, which then list the directory)."""
    path = f"{proc}/{pid}/fd"
    try:
        if proc == PROC:
            n = os.stat(path).st_size
            if n > 0:
                return int(n)
        return len(os.listdir(path))
    except OSError:
        return None


def facts(pid: int, proc: str = PROC, open_fds: int | None = None) -> ProcFacts:
    """Everything the detectors want to know about one process."""
    cg = cgroup(pid, proc)
    return ProcFacts(
        pid=pid,
        comm=comm(pid, proc),
        cmdline=cmdline(pid, proc),
        cgroup=cg,
        container=container_id(cg),
        open_fds=open_fds if open_fds is not None else count_fds(pid, proc),
        max_fds=nofile_limit(pid, proc),
        start_ticks=start_ticks(pid, proc),
    )


def netns_ino(pid: int, proc: str = PROC) -> int | None:
    try:
        return os.stat(f"{proc}/{pid}/ns/net").st_ino
    except OSError:
        return None


def _readlink_or_empty(name: str, dfd: int) -> str:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return ""


def walk_fds(only: Iterable[int] | None = None, proc: str = PROC, max_fds: int = MAX_FDS_TOTAL) -> FdScan:
    """:func:`pytracer.inventory.owners.scan_fds` by walking /proc/PID/fd: one readlink per fd."""
    out = FdScan()
    targets = sorted(set(only)) if only is not None else pids(proc)
    # Collected into C arrays as we go: no Python object per socket survives.
    s_ino, s_pid, s_fd = array("Q"), array("q"), array("q")
    readlink = os.readlink
    for pid in targets:
        if out.fds >= max_fds:
            out.truncated = True
            break
        try:
            dfd = os.open(f"{proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            if os.path.isdir(f"{proc}/{pid}"):
                out.unreadable += 1
            continue
        try:
            names = os.listdir(dfd)
        except OSError:
            names = []
        if out.fds + len(names) > max_fds:
            names = names[: max(0, max_fds - out.fds)]
            out.truncated = True
        n = len(names)
        out.fds += n
        try:
            try:
                links = [readlink(name, dir_fd=dfd) for name in names]
            except PermissionError:  # listed but not readable: another user's, without CAP_SYS_PTRACE
                links = []
                out.unreadable += 1
            except OSError:  # an fd closed while we read: one at a time
                links = [_readlink_or_empty(name, dfd) for name in names]
        finally:
            os.close(dfd)
        # "socket:[INODE]" (net/socket.c sockfs_dname), "net:[INODE]" (nsfs).
        for name, link in zip(names, links):
            m = _SOCKET_LINK.fullmatch(link) if link[:8] == "socket:[" else None
            if m and name.isascii() and name.isdigit() and int(m.group(1)) < 1 << 64:
                s_ino.append(int(m.group(1)))
                s_pid.append(pid)
                s_fd.append(int(name))
            elif link[:5] == "net:[" and (m := _NET_LINK.fullmatch(link)):
                out.netns_fds.setdefault(int(m.group(1)), f"{proc}/{pid}/fd/{name}")
        out.processes += 1
        out.fd_counts[pid] = n
        ino = netns_ino(pid, proc)
        if ino is not None:
            out.netns_of[pid] = ino
    out.sockets = SocketOwners(np.frombuffer(s_ino, np.uint64), np.frombuffer(s_pid, np.int64),
                               np.frombuffer(s_fd, np.int64))
    return out


def netns_refs(scan: FdScan | None = None, proc: str = PROC, run_dirs: Iterable[str] = NETNS_RUN_DIRS,
               max_netns: int = 4096) -> list[NetnsRef]:
    """Every network namespace we can find, host first, each once.

    Covered: the namespace of this process ("host"), of every process in the
    scan, every netns fd a process holds open, and every ``ip netns`` bind
    mount.  Not covered: a namespace kept alive only by a bind mount
    elsewhere or by a socket, with no process in it.
    """
    refs: list[NetnsRef] = []
    seen: set[int] = set()
    try:
        nsfs_dev: int | None = os.stat(f"{proc}/self/ns/net").st_dev
    except OSError:
        nsfs_dev = None

    def add(path: str, label: str) -> None:
        if len(refs) >= max_netns:
            return
        try:
            st = os.stat(path)
        except OSError:
            return
        # Only nsfs objects: a stale /var/run/netns file left by a failed
        # `ip netns del` is a plain file on another device.
        if st.st_ino in seen or (nsfs_dev is not None and st.st_dev != nsfs_dev):
            return
        seen.add(st.st_ino)
        refs.append(NetnsRef(st.st_ino, path, label))

    add(f"{proc}/self/ns/net", "host")
    for d in run_dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            add(os.path.join(d, name), f"netns {name}")
    if scan is not None:
        for pid, ino in sorted(scan.netns_of.items()):
            if ino not in seen:
                add(f"{proc}/{pid}/ns/net", f"pid {pid}")
        for ino, path in sorted(scan.netns_fds.items()):
            if ino not in seen:
                add(path, f"fd {path}")
    return refs
