"""Which ports name a service, for the per-service histograms.

The kernel keeps lifetime and idle-before-end histograms for at most
``PT_SVC_SLOTS - 1`` services plus ``other`` (pytracer.h, ``pt_svc``), so
the set of ``service`` label values is bounded.  A service is a port and a
role: ``server`` (the listener's port, for accepted connections) or
``client`` (the peer's port, for connected ones).

``--service-ports`` takes a comma-separated list:

    auto              the host's listening ports, then the most used remote
                      ports of its connections, up to the cap (the default)
    8080              port 8080 in both roles
    server:8080       only connections accepted on 8080
    client:5432       only connections made to port 5432

Everything else folds into ``other``, and the kernel counts the folded ends.
With ``auto``, ports found later (each full leak scan) take the slots still
free; a slot, once given, keeps its port, so its histograms stay whole.
:func:`parse`, :func:`rank` and :func:`assign` are pure; :func:`discover`
reads sock_diag.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pytracer.kernel.abi import PT_SVC_SLOTS, Role

CAP = PT_SVC_SLOTS - 1  # slot 0 is "other"
ROLE_NAMES = {Role.SERVER: "server", Role.CLIENT: "client"}


@dataclass(frozen=True)
class Service:
    port: int
    role: Role

    @property
    def label(self) -> str:
        return str(self.port)

    @property
    def role_name(self) -> str:
        return ROLE_NAMES[self.role]


@dataclass(frozen=True)
class Spec:
    """A parsed --service-ports: the named services, and whether to add the
    discovered ones after them."""

    named: tuple[Service, ...] = ()
    auto: bool = True


def parse(text: str | None) -> Spec:
    """Parse --service-ports; ValueError with a one-line reason when bad."""
    if text is None or not text.strip():
        return Spec()
    named: list[Service] = []
    auto = False
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item == "auto":
            auto = True
            continue
        role_text, _, port_text = item.rpartition(":")
        roles = {"": (Role.SERVER, Role.CLIENT), "server": (Role.SERVER,), "client": (Role.CLIENT,)}.get(role_text)
        if roles is None:
            raise ValueError(f"{item!r}: use PORT, server:PORT, client:PORT or auto")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"{item!r}: {port_text!r} is not a port number") from None
        if not 0 < port < 65536:
            raise ValueError(f"{item!r}: ports run from 1 to 65535")
        named.extend(Service(port, r) for r in roles)
    return Spec(tuple(dict.fromkeys(named)), auto)


def rank(listening: Iterable[int], remote: Iterable[int], cap: int = CAP) -> list[Service]:
    """Discovered services, at most ``cap``: every listening port (lowest
    first), then remote ports by how many connections use them."""
    out = [Service(p, Role.SERVER) for p in sorted(set(listening))]
    for port, _n in sorted(Counter(remote).items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(Service(port, Role.CLIENT))
    return out[:cap]


def assign(spec: Spec, discovered: Iterable[Service] = (), cap: int = CAP) -> dict[Service, int]:
    """Slots 1..cap: the named services first, then the discovered ones."""
    chosen = list(dict.fromkeys([*spec.named, *(discovered if spec.auto else ())]))
    return {s: i + 1 for i, s in enumerate(chosen[:cap])}


def discover(cap: int = CAP) -> list[Service]:
    """The host's listening ports, in every network namespace we can find
    (sock_diag), at start.  Listeners only: a dump of every connection
    would cost start-up ~1 s per 100k sockets; the most used remote ports
    come from the first full leak scan, which sees them anyway (auto)."""
    from pytracer.inventory import procs, session  # noqa: PLC0415 - they pull numpy: import on use
    from pytracer.kernel.tcp_states import TcpState  # noqa: PLC0415

    states = 1 << int(TcpState.LISTEN)
    return from_rows(session.inventory(procs.netns_refs(), states=states).rows, cap)


def from_rows(rows: Any, cap: int = CAP, remote: Mapping[int, int] | None = None) -> list[Service]:
    """:func:`rank` of sock_diag inventory rows: their listening ports, and
    the remote ports of the connections this host made; ``remote``: more of
    those, counted already (port -> connections)."""
    import numpy as np  # noqa: PLC0415 - rows are numpy already

    from pytracer.kernel.tcp_states import TcpState  # noqa: PLC0415

    listen = rows["state"] == int(TcpState.LISTEN)
    listening = set(int(p) for p in rows["lport"][listen])
    # Established connections whose local port is no listener's: the host connected them.
    est = rows["state"] == int(TcpState.ESTABLISHED)
    outgoing = rows[est & ~np.isin(rows["lport"], list(listening) or [-1])]
    counts = Counter(int(p) for p in outgoing["rport"])
    counts.update(remote or {})
    return rank(listening, counts, cap)
