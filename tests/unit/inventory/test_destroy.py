"""The SOCK_DESTROY request: pyroute2's encoding of it agrees, byte for byte,
with the project's own exact-lookup request (sockdiag), so the cookie and the
addresses the kernel matches on are the ones the inventory reported.  No kernel."""

from __future__ import annotations

import errno
import socket
import struct

import numpy as np
import pytest

from pytracer.inventory import sockdiag
from pytracer.inventory.destroy import SOCK_DESTROY, explain, request_fields


def row(family: int, laddr: str, raddr: str) -> np.void:
    r = np.zeros(1, sockdiag.INV_DTYPE)
    r["cookie"], r["family"], r["lport"], r["rport"], r["ifindex"] = 0x0102_0304_0506_0708, family, 8080, 40001, 3
    for col, text in (("laddr", laddr), ("raddr", raddr)):
        raw = socket.inet_pton(family, text)
        r[col][0, : len(raw)] = np.frombuffer(raw, np.uint8)
    return r[0]


@pytest.mark.parametrize(("family", "laddr", "raddr"), [
    (socket.AF_INET, "10.0.0.1", "10.0.0.2"),
    (socket.AF_INET6, "fd00::1", "::ffff:10.0.0.2"),
])
def test_request_matches_the_exact_lookup(family: int, laddr: str, raddr: str) -> None:
    diag = pytest.importorskip("pyroute2.netlink.diag")
    assert diag.SOCK_DESTROY == SOCK_DESTROY
    r = row(family, laddr, raddr)
    req = diag.inet_diag_req()
    for k, v in request_fields(r).items():
        req[k] = v
    req["header"]["type"] = SOCK_DESTROY
    req.encode()
    body = bytes(req.data[16:])
    ours = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, sockdiag.ALL_STATES) + sockdiag._sockid(r)
    assert body == ours
    # The cookie the kernel compares (two native u32, low word first).
    assert struct.unpack_from("=II", body, len(body) - 8) == (0x0506_0708, 0x0102_0304)


def test_errors_say_what_to_do() -> None:
    assert "CONFIG_INET_DIAG_DESTROY" in explain(errno.EOPNOTSUPP)
    assert "CAP_NET_ADMIN" in explain(errno.EPERM)
    assert "gone" in explain(errno.ENOENT) and "gone" in explain(errno.ESTALE)
