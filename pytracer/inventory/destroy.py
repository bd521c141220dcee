"""Ending one TCP socket on purpose: SOCK_DESTROY over sock_diag netlink.

The only module that imports pyroute2.  The request is an
``inet_diag_req_v2`` naming one socket exactly (4-tuple, interface and
cookie) sent with message type SOCK_DESTROY instead of SOCK_DIAG_BY_FAMILY
(include/uapi/linux/sock_diag.h); pyroute2 declares the message and runs
the netlink exchange.  What the kernel does with it (net/ipv4/inet_diag.c
``inet_diag_cmd_exact``, net/ipv4/tcp_diag.c ``tcp_diag_destroy``,
net/core/sock_diag.c ``sock_diag_destroy``, net/ipv4/tcp.c ``tcp_abort``):

* looks the socket up by 4-tuple in the namespace of the netlink socket;
  a socket whose cookie differs (the 4-tuple was reused) is ESTALE, a socket
  that is gone ENOENT;
* checks CAP_NET_ADMIN in the user namespace owning the socket's network
  namespace (EPERM);
* without CONFIG_INET_DIAG_DESTROY there is no destroy handler: EOPNOTSUPP,
  for any request, so :func:`probe` can ask with a socket that does not exist;
* ``tcp_abort()``: the socket gets ECONNABORTED, a RST goes to the peer, and
  it is closed and unhashed.  A socket still held by a process keeps its
  file: the application sees the error on its next call, and must still
  close() the fd itself.  A timewait minisocket (TIME_WAIT, or a FIN_WAIT2
  orphan after close()) is descheduled; a request socket is dropped.

Namespaces: a sock_diag socket answers for the namespace it was created in,
so :class:`Destroyer` creates one per namespace, inside it
(:func:`pytracer.inventory.netns.run_in_netns`), when first needed, and
closes them all on exit.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
import sys
from typing import Any

import numpy as np

from pytracer.inventory.netns import own_netns, run_in_netns
from pytracer.inventory.procs import NetnsRef
from pytracer.inventory.sockdiag import ALL_STATES, IPPROTO_TCP, NETLINK_SOCK_DIAG, NOCOOKIE

# include/uapi/linux/sock_diag.h
SOCK_DESTROY = 21


class DestroyError(OSError):
    """A SOCK_DESTROY request failed; ``errno`` holds the kernel's reason."""


def explain(err: int) -> str:
    """One sentence for a failed SOCK_DESTROY, saying what to do where there is something to do."""
    if err == errno.EOPNOTSUPP:
        return ("this kernel cannot end sockets over sock_diag: it was built without CONFIG_INET_DIAG_DESTROY "
                "(rebuild with it, or end the owning process instead)")
    if err == errno.EPERM:
        return "ending a socket needs CAP_NET_ADMIN in the socket's network namespace: run as root (sudo)"
    if err in (errno.ENOENT, errno.ESTALE):
        return "the socket is gone (or its 4-tuple now belongs to another socket)"
    return os.strerror(err)


def _words(raw: bytes) -> tuple[int, int, int, int]:
    """A 16-byte network-order address as pyroute2's ``>4I`` field."""
    return struct.unpack(">4I", bytes(raw)[:16].ljust(16, b"\0"))


def request_fields(row: np.void | dict[str, Any]) -> dict[str, Any]:
    """The inet_diag_req_v2 fields naming the socket of one inventory row
    (INV_DTYPE: family, ports, addresses, ifindex, cookie)."""
    cookie = int(row["cookie"])
    if sys.byteorder == "big":
        # The kernel reads the cookie as two native u32, low word first.
        cookie = ((cookie & 0xFFFFFFFF) << 32) | (cookie >> 32)
    return {
        "sdiag_family": int(row["family"]),
        "sdiag_protocol": IPPROTO_TCP,
        "idiag_ext": 0,
        "idiag_states": ALL_STATES,
        "idiag_sport": int(row["lport"]),
        "idiag_dport": int(row["rport"]),
        "idiag_src": _words(row["laddr"]),
        "idiag_dst": _words(row["raddr"]),
        "idiag_if": int(row["ifindex"]),
        "idiag_cookie": cookie,
    }


def _netlink_socket() -> socket.socket:
    # pyroute2's event loop wants a datagram socket; netlink takes both kinds.
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)


class Destroyer:
    """pyroute2 sock_diag sockets, one per namespace, for the length of one run.

    >>> with Destroyer(refs) as d:        # doctest: +SKIP
    ...     d.destroy(row)                # raises DestroyError
    """

    def __init__(self, refs: dict[int, NetnsRef], timeout: float = 5.0) -> None:
        self.refs = refs
        self.timeout = timeout
        self._socks: dict[int, Any] = {}
        self._own = -1

    def __enter__(self) -> Destroyer:
        self._own = own_netns()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks = {}

    def _socket(self, netns: int) -> Any:
        from pyroute2.netlink.nlsocket import NetlinkSocket

        if netns not in self._socks:
            if netns == self._own:
                raw = _netlink_socket()
            else:
                ref = self.refs.get(netns)
                if ref is None:
                    raise DestroyError(errno.ENOENT, f"network namespace {netns} is not known (no process in it?)")
                try:
                    raw = run_in_netns(ref, _netlink_socket, self.timeout)
                except OSError as exc:
                    raise DestroyError(exc.errno or errno.EIO,
                                       f"cannot enter {ref.label} (netns {netns}): {exc.strerror or exc}") from None
            try:
                self._socks[netns] = NetlinkSocket(NETLINK_SOCK_DIAG, use_socket=raw)
            except TypeError:
                # pyroute2 before 0.8 takes no socket: it opens its own in its
                # constructor, so build it in the namespace (a thread of its own).
                raw.close()
                make = functools.partial(NetlinkSocket, NETLINK_SOCK_DIAG)
                if netns == self._own:
                    self._socks[netns] = make()
                else:
                    self._socks[netns] = run_in_netns(self.refs[netns], make, self.timeout)
            except BaseException:
                raw.close()
                raise
        return self._socks[netns]

    def destroy(self, row: np.void | dict[str, Any]) -> None:
        """End the socket ``row`` names (INV_DTYPE, with its netns), or raise DestroyError."""
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.diag import inet_diag_req
        from pyroute2.netlink.exceptions import NetlinkError

        sock = self._socket(int(row["netns"]))
        req = inet_diag_req()
        for k, v in request_fields(row).items():
            req[k] = v
        try:
            # One reply: the ack (NLMSG_ERROR 0) or the error, which pyroute2 raises.
            for _ in sock.nlm_request(req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK):
                pass
        except NetlinkError as exc:
            raise DestroyError(exc.code, explain(exc.code)) from None


def probe(netns_ref: NetnsRef | None = None) -> int:
    """0 when this kernel can end sockets over sock_diag, else the errno
    (EOPNOTSUPP: no CONFIG_INET_DIAG_DESTROY).  Asks to end a socket that
    cannot exist (port 0 to port 0 on 0.0.0.0, no cookie): a kernel with the
    handler answers ENOENT before any capability check."""
    row = {"family": socket.AF_INET, "lport": 0, "rport": 0, "laddr": bytes(16), "raddr": bytes(16),
           "ifindex": 0, "cookie": NOCOOKIE, "netns": 0}
    refs = {}
    if netns_ref is not None:
        row["netns"] = netns_ref.ino
        refs[netns_ref.ino] = netns_ref
    with Destroyer(refs) as d:
        if netns_ref is None:
            row["netns"] = d._own
        try:
            d.destroy(row)
        except DestroyError as exc:
            return 0 if exc.errno in (errno.ENOENT, errno.ESTALE) else int(exc.errno or errno.EIO)
    return 0
