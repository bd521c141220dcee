"""Socket owners from BPF iterators instead of a walk of /proc/*/fd.

``ss -p`` (and :func:`pytracer.inventory.owners.scan_fds` without BPF) finds who holds a
socket with one ``readlink`` per fd of every process: 100k+ syscalls and
Python strings on a busy host, every leak scan.  bpf/fdscan.bpf.c has two
iterators that write the same facts as fixed-size records
(bpf/fdscan.h, ``struct pt_fd_rec``):

* ``iter/task``: one record per process (thread group leader) with its
  netns inode, so processes without open files (kernel threads) count too;
* ``iter/task_file``: one record per open fd: a socket's inode, a netns fd's
  namespace inode, or just "another file" (for the per-process fd count).

They are read like files (BPF_ITER_CREATE) into a buffer that numpy views
as :data:`FD_REC_DTYPE`; :func:`parse` turns the records into the
:class:`~pytracer.inventory.procs.FdScan` the /proc walk returns, with no Python
object per fd.

The object is loaded once per process and kept (:func:`shared`); loading
costs a parse of the kernel's BTF (~10 ms).  Why it cannot be used (no
BTF, a kernel before 5.8, no libbpf, the load refused, another pid
namespace) is remembered too, so callers fall back to /proc without
retrying every scan.  ``PYTRACER_FDSCAN=proc`` forces the /proc walk.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import struct
import threading
from typing import Iterable

import numpy as np

from pytracer.inventory import procs
from pytracer.inventory.procs import MAX_FDS_TOTAL, PROC, FdScan, SocketOwners
from pytracer.kernel import libbpf
from pytracer.kernel.environment import can_trace, effective_caps

log = logging.getLogger(__name__)

# bpf/fdscan.h: PT_FD_*
KIND_TASK, KIND_SOCKET, KIND_NETNS, KIND_OTHER = 0, 1, 2, 3

# struct pt_fd_rec (bpf/fdscan.h): 24 bytes.
FD_REC_DTYPE = np.dtype([("tgid", "<u4"), ("fd", "<i4"), ("ino", "<u8"), ("kind", "<u4"), ("_pad", "<u4")])

# The initial pid namespace's inode (include/linux/proc_ns.h, PROC_PID_INIT_INO):
# the iterators report pids as the initial namespace numbers them.
PROC_PID_INIT_INO = 0xEFFFFFFC

ONLY_MAX = 4096  # bpf/fdscan.h: PT_FD_ONLY_MAX

OBJECT = "bpf/fdscan.bpf.o"
PROGRAMS = ("fdscan_task", "fdscan_file")


class FdScanUnavailable(RuntimeError):
    """The iterators cannot run here; the message says why."""


def parse(tasks: np.ndarray, files: np.ndarray, only: Iterable[int] | None = None, proc: str = PROC,
          max_fds: int = MAX_FDS_TOTAL) -> FdScan:
    """Records of both iterators -> the FdScan a walk of /proc would give.

    ``tasks`` and ``files`` are arrays of :data:`FD_REC_DTYPE` (any order).
    Like the walk: processes in ascending pid order, fds in ascending order
    within each; at most ``max_fds`` fds, the cut falling inside a process
    if need be (``truncated``); ``netns_fds`` names the lowest (pid, fd)
    holding each namespace.  ``unreadable`` is always 0: the kernel hands
    over every table.  A process that started between the two iterators
    has files but no task record; it counts as a process without a netns.
    """
    out = FdScan()
    tasks = tasks[tasks["kind"] == KIND_TASK]
    if (files["kind"] == KIND_TASK).any():
        files = files[files["kind"] != KIND_TASK]
    if only is not None:
        want = np.fromiter(sorted({int(p) for p in only}), np.int64)
        tasks = tasks[np.isin(tasks["tgid"], want)]
        files = files[np.isin(files["tgid"], want)]
    # The iterators visit pids in ascending order and each table's fds in
    # ascending order (kernel/bpf/task_iter.c): sort only if that ever changes.
    t, f = files["tgid"], files["fd"]
    if len(files) > 1 and not bool(((t[1:] > t[:-1]) | ((t[1:] == t[:-1]) & (f[1:] > f[:-1]))).all()):
        files = files[np.lexsort((files["fd"], files["tgid"]))]
    del t, f
    if len(files) > max_fds:
        files = files[: max(0, max_fds)]
        out.truncated = True
        # The walk stops before the first process after the one the cut fell in.
        last = int(files["tgid"][-1]) if len(files) else -1
        tasks = tasks[tasks["tgid"] <= last]
    pids, counts = _runs(files["tgid"])  # in (tgid, fd) order: each process's fds are one run
    task_pids = np.union1d(tasks["tgid"], pids)
    out.fds = int(len(files))
    out.processes = int(len(task_pids))
    out.fd_counts = dict.fromkeys(task_pids.tolist(), 0)
    out.fd_counts.update(zip(pids.tolist(), counts.tolist()))
    ns = tasks[tasks["ino"] != 0]
    out.netns_of = dict(zip(ns["tgid"].astype(np.int64).tolist(), ns["ino"].astype(np.int64).tolist()))
    nsf = files[files["kind"] == KIND_NETNS]
    for tgid, fd, ino in zip(nsf["tgid"].tolist(), nsf["fd"].tolist(), nsf["ino"].tolist()):
        out.netns_fds.setdefault(int(ino), f"{proc}/{tgid}/fd/{fd}")
    is_sock = files["kind"] == KIND_SOCKET
    out.sockets = SocketOwners(files["ino"][is_sock], files["tgid"][is_sock], files["fd"][is_sock], by_pid_fd=True)
    return out


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each distinct value, how many times) of an ascending array, from
    where its runs start: no sorted copy of it, as ``np.unique`` makes
    (100k fds are 100k tgids)."""
    if not len(sorted_values):
        return sorted_values[:0], np.zeros(0, np.intp)
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
    return sorted_values[starts], np.diff(np.append(starts, len(sorted_values)))


def merge(out: FdScan, more: FdScan) -> FdScan:
    """Add a scan of other processes to ``out`` (in place)."""
    if len(more.sockets.inodes):
        s = out.sockets
        out.sockets = SocketOwners(np.concatenate([s.inodes, more.sockets.inodes]),
                                   np.concatenate([s.pids, more.sockets.pids]),
                                   np.concatenate([s.fds, more.sockets.fds]))
    out.fd_counts.update(more.fd_counts)
    out.netns_of.update(more.netns_of)
    for ino, path in more.netns_fds.items():
        out.netns_fds.setdefault(ino, path)
    out.processes += more.processes
    out.fds += more.fds
    out.truncated |= more.truncated
    out.unreadable += more.unreadable
    return out


def _object_bytes() -> bytes:
    try:
        return libbpf.packaged_object(OBJECT, "PYTRACER_FDSCAN_OBJECT")
    except OSError as exc:
        raise FdScanUnavailable(f"pytracer/{OBJECT} is missing ({exc.strerror}): build it with `make`") from None


class FdIterators:
    """The loaded fdscan object and its two iterator links.  Reading runs
    the programs; nothing runs in between.  A context manager."""

    def __init__(self) -> None:
        self.obj: libbpf.BpfObject | None = None
        self.links: dict[str, libbpf.Link] = {}
        self._lock = threading.Lock()
        self._last_bytes: dict[str, int] = {}
        self._only: set[int] = set()  # tgids now in the only_tgids map

    def open(self) -> FdIterators:
        try:
            libbpf.library()
        except libbpf.LibbpfMissing as exc:
            raise FdScanUnavailable(str(exc)) from None
        if not os.path.exists("/sys/kernel/btf/vmlinux"):
            raise FdScanUnavailable("no kernel BTF (/sys/kernel/btf/vmlinux)")
        try:
            if os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO:
                raise FdScanUnavailable("not in the initial pid namespace (the iterators report its pids)")
        except OSError as exc:
            raise FdScanUnavailable(f"cannot read /proc/self/ns/pid: {exc.strerror}") from None
        data = _object_bytes()
        try:
            self.obj = libbpf.BpfObject(data, "pt_fdscan")
            self.obj.load()
            for name in PROGRAMS:
                self.links[name] = self.obj.program(name).attach_iter()
        except libbpf.LibbpfError as exc:
            self.close()
            tail = exc.log.strip().splitlines()[-1:] if exc.log else []
            raise FdScanUnavailable(f"{exc}" + (f" ({tail[0].strip()})" if tail else "")) from None
        return self

    def _set_only(self, only: Iterable[int] | None) -> None:
        """Make the programs skip every process but ``only`` (None: none
        skipped; more than ONLY_MAX pids: filtered in user space instead)."""
        assert self.obj is not None
        want = {int(p) for p in only} if only is not None else None
        if want is not None and len(want) > ONLY_MAX:
            want = None
        tgids, on = self.obj.map("only_tgids"), self.obj.map("only_on")
        on.update(struct.pack("=I", 0), struct.pack("=I", 0))
        if want is None:
            return
        for pid in self._only - want:
            tgids.delete(struct.pack("=I", pid))
        for pid in want - self._only:
            tgids.update(struct.pack("=I", pid & 0xFFFFFFFF), b"\x01")
        self._only = want
        on.update(struct.pack("=I", 0), struct.pack("=I", 1))

    def _run(self, parse_fn, only: Iterable[int] | None = None):  # noqa: ANN001, ANN202
        """Run both iterators (over ``only``'s processes, or all) and hand
        their records (views of the read buffers) to ``parse_fn``; the
        buffers are unmapped afterwards, so ``parse_fn`` must return copies."""
        with self._lock:
            if self.obj is None:
                raise FdScanUnavailable("the fdscan object is closed")
            self._set_only(only)
            maps = []
            recs: list[np.ndarray] = []
            try:
                for name in PROGRAMS:
                    mm, used = self.links[name].read_iter(max(64 << 20, 2 * self._last_bytes.get(name, 0)))
                    maps.append(mm)
                    self._last_bytes[name] = used
                    n = used // FD_REC_DTYPE.itemsize
                    if n * FD_REC_DTYPE.itemsize != used:
                        raise libbpf.LibbpfError(5, f"{name}: {used} bytes is not a whole number of records")
                    recs.append(np.frombuffer(mm, FD_REC_DTYPE, count=n))
                return parse_fn(recs[0], recs[1])
            finally:
                recs.clear()
                for mm in maps:
                    try:
                        mm.close()
                    except BufferError:  # a view escaped: the collector unmaps it later
                        pass

    def scan(self, only: Iterable[int] | None = None, proc: str = PROC, max_fds: int = MAX_FDS_TOTAL) -> FdScan:
        """The iterators' answer, plus a /proc walk of any process /proc
        lists that they did not report.  On v6.18 here the task iterators
        never visit pid 1; processes started after the pass are read too."""
        only = sorted({int(p) for p in only}) if only is not None else None
        out, reported = self._run(lambda tasks, files: (parse(tasks, files, only, proc, max_fds),
                                                        set(tasks["tgid"].tolist())), only)
        listed = set(procs.pids(proc)) if only is None else {int(p) for p in only}
        missing = sorted(listed.difference(reported).difference(out.fd_counts))
        if missing and not out.truncated:
            log.debug("fd scan: %d processes not reported by the iterators, read from /proc: %s",
                      len(missing), missing[:10])
            merge(out, procs.walk_fds(missing, proc, max_fds - out.fds))
        return out

    def scan_each(self, pids: Iterable[int], proc: str = PROC, max_fds: int = MAX_FDS_TOTAL) -> FdScan:
        """The fds of ``pids`` only, with the kernel visiting no other
        process: a pair of iterator links per process, each bound to it
        (``bpf_iter_link_info.task.pid``, v6.1), unlike :meth:`scan` with
        ``only``, where the kernel still walks every fd table of the host.
        A process that is gone is left out; one the iterators do not report
        (pid 1 on v6.18 here) is read from /proc.  Raises
        :class:`FdScanUnavailable` if the kernel refuses a bound link."""
        want = sorted({int(p) for p in pids})
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        with self._lock:
            if self.obj is None:
                raise FdScanUnavailable("the fdscan object is closed")
            self._set_only(None)
            for pid in want:
                links: list[libbpf.Link] = []
                recs: list[np.ndarray] = []
                try:
                    for name in PROGRAMS:
                        links.append(self.obj.program(name).attach_iter(pid=pid))
                    for link in links:
                        mm, used = link.read_iter(1 << 20)
                        try:
                            recs.append(np.frombuffer(mm, FD_REC_DTYPE, count=used // FD_REC_DTYPE.itemsize).copy())
                        finally:
                            mm.close()
                except libbpf.LibbpfError as exc:
                    if exc.errno in (errno.ESRCH, errno.ENOENT):
                        continue  # exited
                    raise FdScanUnavailable(f"iterator bound to a process: {exc}") from None
                finally:
                    for link in links:
                        link.destroy()
                parts.append((recs[0], recs[1]))
        empty = np.zeros(0, FD_REC_DTYPE)
        tasks = np.concatenate([t for t, _ in parts]) if parts else empty
        files = np.concatenate([f for _, f in parts]) if parts else empty
        out = parse(tasks, files, want, proc, max_fds)
        missing = sorted(set(want).difference(tasks["tgid"].tolist()).difference(out.fd_counts))
        missing = [p for p in missing if os.path.exists(f"{proc}/{p}")]
        if missing and not out.truncated:
            merge(out, procs.walk_fds(missing, proc, max_fds - out.fds))
        return out

    def close(self) -> None:
        for link in self.links.values():
            link.destroy()
        self.links = {}
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def __enter__(self) -> FdIterators:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared: FdIterators | None = None
_shared_reason: str | None = None
_shared_lock = threading.Lock()


def shared() -> FdIterators:
    """The process's loaded iterators (loaded on first use, closed at exit).
    Raises :class:`FdScanUnavailable`, the same reason every time."""
    global _shared, _shared_reason
    with _shared_lock:
        if _shared is not None:
            return _shared
        if _shared_reason is not None:
            raise FdScanUnavailable(_shared_reason)
        forced = os.environ.get("PYTRACER_FDSCAN", "auto")
        try:
            if forced == "proc":
                raise FdScanUnavailable("PYTRACER_FDSCAN=proc")
            if not can_trace(effective_caps()):
                raise FdScanUnavailable("no CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN)")
            _shared = FdIterators().open()
        except FdScanUnavailable as exc:
            _shared_reason = str(exc)
            log.debug("socket owners: walking /proc (the BPF task-file iterator is unavailable: %s)", exc)
            raise
        atexit.register(close_shared)
        log.debug("socket owners: BPF task-file iterator loaded")
        return _shared


def close_shared() -> None:
    """Unload the shared iterators (a later :func:`shared` loads them again)."""
    global _shared, _shared_reason
    with _shared_lock:
        if _shared is not None:
            _shared.close()
        _shared, _shared_reason = None, None


def method() -> tuple[str, str]:
    """("bpf", what) or ("proc", why): what :func:`pytracer.inventory.owners.scan_fds` uses here."""
    try:
        shared()
    except FdScanUnavailable as exc:
        return "proc", str(exc)
    return "bpf", "iter/task_file + iter/task (bpf/fdscan.bpf.c)"
