"""How pytracer writes addresses, address families and durations: once.

Every layer (the leak detectors, the watch report, the views, the exporter)
imports its text from here, so a socket reads the same in ``tracer watch``,
``tracer leaks`` and the metrics.  Pure and stdlib-only: this module imports
nothing else of the project.
"""

from __future__ import annotations

import ipaddress
import socket

AF_INET = int(socket.AF_INET)  # include/linux/socket.h: 2
AF_INET6 = int(socket.AF_INET6)  # 10

_FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}


def family_name(family: int) -> str:
    """"ipv4", "ipv6", or the number for any other family."""
    return _FAMILY_NAMES.get(int(family), str(int(family)))


def address(family: int, raw: bytes, *, unmap: bool = False) -> str:
    """The text of a raw address from the kernel (network byte order, IPv4 in
    the first 4 bytes).  An IPv4-mapped IPv6 address is written as ``ss``
    writes it (``::ffff:10.0.0.1``) unless ``unmap``, which writes the IPv4
    address so that one destination reached either way is one name.  Empty for
    a family that is neither IPv4 nor IPv6.
    """
    b = bytes(raw)
    if family == AF_INET:
        return str(ipaddress.IPv4Address(b[:4]))
    if family != AF_INET6:
        return ""
    addr = ipaddress.IPv6Address(b[:16])
    mapped = addr.ipv4_mapped
    if mapped is None:
        return str(addr)
    # Written the same on every Python (3.13 changed str() of these).
    return str(mapped) if unmap else f"::ffff:{mapped}"


def endpoint(addr: str, port: int) -> str:
    """``addr:port``, with an IPv6 address in brackets."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def duration(seconds: float | None, unknown: str = "-") -> str:
    """A short human duration: ``850us``, ``12.5ms``, ``4.2s``, ``37s``,
    ``5.5m``, ``2.0h``, ``3.1d``; ``unknown`` for None."""
    if seconds is None:
        return unknown
    s = float(seconds)
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    if s < 10:
        return f"{s:.1f}s"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"
