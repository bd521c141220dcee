"""The exporter's Collector: one scrape's reads, against fake backends.

A failed read is counted and never fails the scrape; a closed collector
reads nothing; the leak scan's report and errors are kept; and scrapes
reuse one socket-table buffer yet count only their own table.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pytracer.exporter.collector import TracerCollector
from pytracer.kernel.tcp_states import TcpState
from pytracer.table.reads import SOCK_DTYPE
from tests.unit.exporter.test_families import flag, sock_table


class BrokenTracer:
    """A backend whose every read fails, as after a map fd went bad."""

    ncpus = 1
    backend = "core"
    choices: dict = {}

    def map(self, name: str):
        raise OSError(9, "Bad file descriptor")

    def programs(self):
        raise OSError(9, "Bad file descriptor")


class FailingScanner:
    def scan(self, snapshot):
        raise RuntimeError("sock_diag went away")


def test_failed_reads_are_counted_and_never_fail_the_scrape() -> None:
    c = TracerCollector(BrokenTracer(), scanner=None)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    for _ in range(3):
        text = generate_latest(reg).decode()
    samples = {(s.name, tuple(s.labels.items())): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    for what in ("agg", "socks", "programs"):
        assert samples[("pytracer_read_errors_total", (("what", what),))] == 3
    assert ("pytracer_scrape_duration_seconds", ()) in samples
    assert not any(name == "pytracer_sockets" for name, _ in samples)  # unread: omitted, not zero


def test_closed_collector_reads_nothing() -> None:
    c = TracerCollector(BrokenTracer(), scanner=None)
    c.close()
    fams = c.collect()
    names = {f.name for f in fams}
    assert names == {"pytracer_read_errors", "pytracer_label_overflow", "pytracer_scrape_duration_seconds"}
    assert c.read_errors["agg"] == 0


class RecordingScanner:
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        self.snapshots: list = []

    def scan(self, snapshot):
        self.snapshots.append(snapshot)
        return SimpleNamespace(flags=[flag("close_wait", "api", 5.0)], errors=self.errors)


def test_leak_scan_report_is_kept_and_its_errors_counted() -> None:
    scanner = RecordingScanner(errors=["netns 4026532999: Permission denied"])
    c = TracerCollector(BrokenTracer(), scanner=scanner)
    rep = c._scan_once(scanner, "snap", time.monotonic())
    assert rep is c._report and scanner.snapshots == ["snap"]
    assert c.read_errors["leaks"] == 1 and c.leak_scans == 1
    names = {f.name for f in c._self_families(0.0)}
    assert {"pytracer_leak_scans", "pytracer_leak_scan_duration_seconds", "pytracer_leak_scan_age_seconds"} <= names
    # Without a background thread a scrape scans itself; with a broken tracer
    # there is no snapshot to scan, and that is counted, not raised.
    c.collect()
    assert c.read_errors["agg"] == 1 and len(scanner.snapshots) == 1


class TableTracer:
    """A tracer whose socket table changes between scrapes; its socks map
    writes records the way BPF_MAP_LOOKUP_BATCH does (into the caller's buffers)."""

    ncpus = 1
    backend = "core"
    choices: dict = {}

    def __init__(self) -> None:
        self.table = sock_table([])
        self.targets: list[int] = []
        tracer = self

        class Socks:
            max_entries = 64
            key_size = 8

            def dump_into(self, keys, values, value_size):  # noqa: ANN001
                assert value_size == SOCK_DTYPE.itemsize
                n = len(tracer.table)
                if n > min(len(keys), len(values)):
                    return False, 0
                keys[:n] = np.arange(1, n + 1, dtype=np.uint64)
                values[:n] = tracer.table
                tracer.targets.append(values.__array_interface__["data"][0])
                return True, n

        class Agg:
            def lookup(self, key, size):  # noqa: ANN001
                return bytes(size) if key == bytes(4) else None

        self._maps = {"socks": Socks(), "agg": Agg()}

    def map(self, name: str):
        if name not in self._maps:
            raise KeyError(name)
        return self._maps[name]

    def programs(self):
        return []


def test_scrapes_reuse_one_table_buffer_and_each_counts_only_its_own_table() -> None:
    t = TableTracer()
    c = TracerCollector(t, scanner=None)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    tables = [
        [(int(TcpState.ESTABLISHED), 1)] * 7 + [(int(TcpState.CLOSE_WAIT), 1)] * 3,
        [(int(TcpState.LISTEN), 1)] * 2,  # smaller: a stale tail of the first must not count
        [],
        [(int(TcpState.CLOSE_WAIT), 1)] * 5,
    ]
    for rows in tables:
        t.table = sock_table(rows)
        text = generate_latest(reg).decode()
        got = {dict(s.labels)["state"]: s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name == "pytracer_sockets"}
        want: dict[str, float] = {}
        for state, _ in rows:
            want[TcpState(state).name] = want.get(TcpState(state).name, 0) + 1
        assert {k: v for k, v in got.items() if v} == want
    # One buffer, allocated once and kept by the collector (not a fresh one per scrape).
    held = c._sock_buffers.socks.__array_interface__["data"][0]
    assert t.targets == [held] * len(tables)
