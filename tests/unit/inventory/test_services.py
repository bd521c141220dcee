"""--service-ports: parsing, ranking and slot assignment (pure)."""

from __future__ import annotations

import pytest

from pytracer.inventory.services import CAP, Service, Spec, assign, parse, rank
from pytracer.kernel.abi import PT_SVC_SLOTS, Role
from pytracer.kernel.environment import hz_from_config, hz_from_timer_list


def test_parse_ports_roles_and_auto() -> None:
    assert parse(None) == Spec((), True)
    assert parse("auto") == Spec((), True)
    spec = parse("8080, client:5432,server:443")
    assert spec.auto is False
    assert spec.named == (Service(8080, Role.SERVER), Service(8080, Role.CLIENT), Service(5432, Role.CLIENT),
                          Service(443, Role.SERVER))
    assert parse("auto,80").auto and parse("auto,80").named[0] == Service(80, Role.SERVER)


@pytest.mark.parametrize("bad", ["http", "client:x", "peer:80", "0", "70000"])
def test_parse_refuses_bad_items_with_a_reason(bad: str) -> None:
    with pytest.raises(ValueError, match=bad.split(":")[0] if ":" in bad else "'"):
        parse(bad)


def test_rank_listeners_first_then_busiest_remote_ports_capped() -> None:
    got = rank([443, 22], [5432, 5432, 6379, 5432, 6379, 53], cap=4)
    assert got == [Service(22, Role.SERVER), Service(443, Role.SERVER), Service(5432, Role.CLIENT),
                   Service(6379, Role.CLIENT)]


def test_assign_named_first_bounded_by_the_kernel_slots() -> None:
    found = [Service(p, Role.SERVER) for p in range(1000, 1100)]
    slots = assign(Spec((Service(5432, Role.CLIENT),), auto=True), found)
    assert slots[Service(5432, Role.CLIENT)] == 1
    assert len(slots) == CAP == PT_SVC_SLOTS - 1
    assert sorted(slots.values()) == list(range(1, PT_SVC_SLOTS))
    assert assign(Spec((Service(1, Role.SERVER),), auto=False), found) == {Service(1, Role.SERVER): 1}


def test_hz_from_config_and_timer_list() -> None:
    assert hz_from_config("CONFIG_X=y\nCONFIG_HZ=250\n") == 250
    assert hz_from_config("# CONFIG_HZ is not set\n") is None
    # jiffies = 2**32 - 300 * HZ + uptime * HZ
    for hz in (100, 250, 300, 1000):
        assert hz_from_timer_list(f"now at 1 nsecs\njiffies: {(1 << 32) - 300 * hz + 5000 * hz}\n", 5000.0) == hz
    assert hz_from_timer_list("jiffies: 4294967296\n", 100.0) is None  # too early to tell


def test_from_rows_listeners_and_the_hosts_own_connections() -> None:
    import numpy as np

    from pytracer.inventory.services import from_rows
    from pytracer.inventory.sockdiag import INV_DTYPE
    from pytracer.kernel.tcp_states import TcpState

    rows = np.zeros(5, INV_DTYPE)
    rows["state"] = [TcpState.LISTEN, TcpState.ESTABLISHED, TcpState.ESTABLISHED, TcpState.ESTABLISHED,
                     TcpState.TIME_WAIT]
    rows["lport"] = [80, 80, 40001, 40002, 40003]  # an accepted one on 80, two of ours to 5432, one closed
    rows["rport"] = [0, 51000, 5432, 5432, 6379]
    assert from_rows(rows) == [Service(80, Role.SERVER), Service(5432, Role.CLIENT)]


class _Map:
    def __init__(self, room: int) -> None:
        self.room, self.items = room, {}

    def update(self, key: bytes, value: bytes) -> None:
        if len(self.items) >= self.room:
            raise OSError(7, "E2BIG")  # errno.E2BIG: a full hash map
        self.items[key] = value


def test_services_found_while_running_take_only_free_slots() -> None:
    from types import SimpleNamespace

    from pytracer.table.writer import add_services

    m = _Map(room=PT_SVC_SLOTS - 1)
    tracer = SimpleNamespace(services={Service(80, Role.SERVER): 1, Service(5432, Role.CLIENT): 3},
                             map=lambda name: m)
    assert add_services(tracer, [Service(80, Role.SERVER), Service(443, Role.SERVER), Service(22, Role.SERVER)]) == 2
    # Slots once given keep their port; new ones fill the gaps first.
    assert tracer.services == {Service(80, Role.SERVER): 1, Service(5432, Role.CLIENT): 3,
                               Service(443, Role.SERVER): 2, Service(22, Role.SERVER): 4}
    many = [Service(p, Role.SERVER) for p in range(1000, 1100)]
    assert add_services(tracer, many) == PT_SVC_SLOTS - 1 - 4
    assert sorted(tracer.services.values()) == list(range(1, PT_SVC_SLOTS))
    assert add_services(tracer, [Service(9, Role.SERVER)]) == 0
