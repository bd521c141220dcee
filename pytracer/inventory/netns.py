"""Network namespaces: entering one, and the sysctls each answers for itself.

A netlink socket answers for the namespace it was created in, and
/proc/sys/net for the reader's namespace.  To work in another namespace
(found by :mod:`pytracer.inventory.procs`), :func:`run_in_netns` has a
short-lived thread enter it with setns(2) (which changes only the calling
thread), do the work there (create a socket, read the sysctls), return to its
own namespace and exit.  Nothing here keeps a namespace alive: only what the
work created there (a socket, which its owner closes).

:class:`NetnsInfo` holds the namespace's sysctls the leak rules use
(``ip_local_port_range``, ``tcp_fin_timeout``, ``tcp_tw_reuse``,
``tcp_max_tw_buckets``), as :func:`_read_sysctls` reads them inside it.

Used by the sock_diag sessions (:mod:`pytracer.inventory.session`) and by the
socket destroyers (:mod:`pytracer.inventory.destroy`,
:mod:`pytracer.inventory.bpfdestroy`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from pytracer.inventory.procs import NetnsRef

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        need = " (needs CAP_SYS_ADMIN)" if err == errno.EPERM else ""
        raise OSError(err, f"setns: {os.strerror(err)}{need}")


@dataclass
class NetnsInfo:
    ino: int
    label: str
    path: str
    port_range: tuple[int, int] | None = None  # net.ipv4.ip_local_port_range
    fin_timeout: int | None = None  # net.ipv4.tcp_fin_timeout, seconds
    tw_reuse: int | None = None  # net.ipv4.tcp_tw_reuse
    max_tw_buckets: int | None = None  # net.ipv4.tcp_max_tw_buckets
    error: str | None = None
    # TCP sockets in the namespace, as /proc/net/sockstat and sockstat6 count
    # them (IPv4 and IPv6 hashed sockets, and the timewait minisockets of
    # both) when the namespace was entered; None: not known.  Not reported:
    # it only lets a dump skip a namespace with none (see Session.dump).
    tcp_sockets: int | None = None
    tcp6_inuse: int | None = None  # of which IPv6 hashed (full) sockets: sockstat6's TCP6 inuse

    @property
    def port_range_size(self) -> int | None:
        if self.port_range is None:
            return None
        return self.port_range[1] - self.port_range[0] + 1

    def to_json(self) -> dict:
        return {
            "netns": self.ino,
            "label": self.label,
            "port_range": list(self.port_range) if self.port_range else None,
            "fin_timeout_seconds": self.fin_timeout,
            "tw_reuse": self.tw_reuse,
            "max_tw_buckets": self.max_tw_buckets,
            "error": self.error,
        }


def _read_sysctls(info: NetnsInfo) -> None:
    def ints(name: str) -> list[int] | None:
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                return [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return None

    pr = ints("ip_local_port_range")
    if pr and len(pr) == 2:
        info.port_range = (pr[0], pr[1])
    for name, attr in (("tcp_fin_timeout", "fin_timeout"), ("tcp_tw_reuse", "tw_reuse"),
                       ("tcp_max_tw_buckets", "max_tw_buckets")):
        v = ints(name)
        if v:
            setattr(info, attr, v[0])
    info.tcp_sockets, info.tcp6_inuse = _tcp_sockets()


def _tcp_sockets(net: str = "/proc/thread-self/net") -> tuple[int | None, int | None]:
    """TCP sockets in the calling thread's namespace: "inuse" and "tw" of
    sockstat's TCP line and "inuse" of sockstat6's TCP6 line.  inuse counts
    every socket in the kernel's TCP hash tables (listeners, connecting,
    established, closing, orphans), tw the timewait minisockets of both
    families (TIME_WAIT, and FIN_WAIT2 after close()).  None when either
    file cannot be read (no IPv6, say): then nothing is skipped.  Also
    sockstat6's count alone (see :func:`parse_sockstat`)."""
    try:
        with open(f"{net}/sockstat") as f:
            v4 = f.read()
        with open(f"{net}/sockstat6") as f:
            v6 = f.read()
    except OSError:
        return None, None
    return parse_sockstat(v4, v6)


def parse_sockstat(v4: str, v6: str) -> tuple[int | None, int | None]:
    """(inuse + tw of the "TCP:" line of ``v4`` (/proc/net/sockstat) plus
    inuse of the "TCP6:" line of ``v6`` (sockstat6), that IPv6 inuse
    alone); None where a line or field is missing or not a count."""
    def fields(text: str, label: str) -> dict[str, str] | None:
        for line in text.splitlines():
            head, _, rest = line.partition(":")
            if head == label:
                words = rest.split()
                return dict(zip(words[::2], words[1::2]))
        return None

    tcp, tcp6 = fields(v4, "TCP"), fields(v6, "TCP6")
    if tcp is None or tcp6 is None:
        return None, None
    try:
        counts = [int(tcp["inuse"]), int(tcp["tw"]), int(tcp6["inuse"])]
    except (KeyError, ValueError):
        return None, None
    if min(counts) < 0:  # per-CPU sums read mid-update can dip below zero: not known
        return None, None
    return sum(counts), counts[2]


def own_netns() -> int:
    """The inode of the calling thread's network namespace (-1 if unreadable)."""
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return -1


def run_in_netns(ref: NetnsRef, fn: Callable[[], T], timeout: float = 5.0) -> T:
    """``fn()`` run inside the namespace ``ref`` names, by a short-lived
    thread that enters it with setns(2) (which changes only the calling
    thread), calls ``fn``, returns to its own namespace and exits.  What
    ``fn`` creates there (a socket) stays in that namespace.  Raises
    OSError when the namespace cannot be entered, changed under its path,
    or the thread does not finish within ``timeout``."""
    result: list[T] = []
    errors: list[OSError] = []

    def work() -> None:
        home = target = -1
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            target = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(target).st_ino != ref.ino:
                errors.append(OSError(errno.ESTALE, "namespace changed under its path"))
                return
            _setns(target)
            try:
                result.append(fn())
            finally:
                _setns(home)
        except OSError as exc:
            errors.append(exc)
        finally:
            for fd in (home, target):
                if fd >= 0:
                    os.close(fd)

    t = threading.Thread(target=work, name=f"pytracer-netns-{ref.ino}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise OSError(errno.ETIMEDOUT, "timed out entering the namespace")
    if errors:
        raise errors[0]
    return result[0]
