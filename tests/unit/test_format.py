"""pytracer.format: the one writer of addresses, families and durations."""

import ipaddress
import socket

import pytest

from pytracer.format import AF_INET, AF_INET6, address, duration, endpoint, family_name


def raw(text: str) -> bytes:
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def test_constants_are_the_kernels() -> None:
    assert (AF_INET, AF_INET6) == (socket.AF_INET, socket.AF_INET6) == (2, 10)


@pytest.mark.parametrize("fam,text,unmap,want", [
    (AF_INET, "10.1.2.3", False, "10.1.2.3"),
    (AF_INET6, "2001:db8::1", False, "2001:db8::1"),
    (AF_INET6, "::ffff:127.0.0.1", False, "::ffff:127.0.0.1"),  # as ss writes it
    (AF_INET6, "::ffff:127.0.0.1", True, "127.0.0.1"),
    (AF_INET6, "2001:db8::1", True, "2001:db8::1"),
    (1, "10.1.2.3", False, ""),
])
def test_address(fam: int, text: str, unmap: bool, want: str) -> None:
    assert address(fam, raw(text), unmap=unmap) == want


def test_family_and_endpoint() -> None:
    assert [family_name(f) for f in (2, 10, 1)] == ["ipv4", "ipv6", "1"]
    assert endpoint("10.0.0.1", 80) == "10.0.0.1:80"
    assert endpoint("::1", 80) == "[::1]:80"


@pytest.mark.parametrize("seconds,want", [
    (None, "-"), (0.00085, "850us"), (0.0125, "12.5ms"), (4.24, "4.2s"), (37.4, "37s"),
    (330, "5.5m"), (7200, "2.0h"), (3.1 * 86400, "3.1d"),
])
def test_duration(seconds: float | None, want: str) -> None:
    assert duration(seconds) == want


def test_duration_unknown_text() -> None:
    assert duration(None, unknown="an unknown time") == "an unknown time"
