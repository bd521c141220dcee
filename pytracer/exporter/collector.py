"""The Prometheus Collector: reads the kernel maps at scrape time.

Nothing here keeps a second copy of the kernel's truth.  Every scrape reads
the per-CPU aggregate (:mod:`pytracer.table.poll`) and the socket table
(:mod:`pytracer.table.reads`; with the scan thread running, only its live
records per state are needed, so it is counted a chunk at a time and never
held whole), the programs' run
statistics and the latest leak report, and hands them to the
pure :func:`pytracer.exporter.families.build_families`.  Each read is in its
own ``try``: a failed read is logged and counted
(``pytracer_read_errors_total{what}``) and never fails the scrape.  The only
state held in Python is the exporter's own bookkeeping (read errors, label
values folded into ``other``, scrape and scan timings), exported by
:meth:`TracerCollector._self_families`.

The leak scan (:mod:`pytracer.leaks.scanner`: sock_diag over every
namespace, /proc, tcp_info) costs far more than the map reads, so the
collector owns a background thread that runs it and keeps the latest report.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
import time
from typing import Any, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pytracer import __version__
from pytracer.exporter import ExportError
from pytracer.exporter.families import NAMESPACE, ExportOptions, MapStat, ProgramStat, ScrapeInput, build_families
from pytracer.table.health import FillTracker, failed_inserts

log = logging.getLogger("pytracer.exporter")

DEFAULT_LEAK_INTERVAL = 15.0

# Hash maps whose fill level is worth watching; missing ones are skipped.
WATCHED_MAPS = ("socks", "owners", "listeners", "svc_ports")

# Reads a scrape makes; their error counters exist from the start at 0.
READS = ("agg", "socks", "services", "maps", "programs", "leaks")


def bpf_stats_enabled(path: str = "/proc/sys/kernel/bpf_stats_enabled") -> bool:
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class BpfStats:
    """Kernel BPF run-time statistics held on for as long as this is open.

    BPF_ENABLE_STATS (v5.8) returns an fd; the kernel counts run time and
    runs of every program while any such fd is open, without touching the
    kernel.bpf_stats_enabled sysctl other tools may own.
    """

    BPF_STATS_RUN_TIME = 0

    def __init__(self) -> None:
        from pytracer.kernel import libbpf

        lib = libbpf.library()
        fn = lib.bpf_enable_stats
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
        rc = fn(self.BPF_STATS_RUN_TIME)
        if rc < 0:
            err = -rc if rc != -1 else (ctypes.get_errno() or errno.EPERM)
            raise ExportError(f"cannot turn on BPF run-time statistics: {os.strerror(err)} (needs CAP_SYS_ADMIN)")
        self.fd: int | None = rc

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> BpfStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TracerCollector(Collector):
    """Reads the tracer's maps at scrape time and yields fresh metric families.

    ``tracer`` is a loaded :class:`pytracer.kernel.core.Tracer` (or any backend
    with ``map()``, ``ncpus``, ``programs()``, ``choices`` and ``backend``).
    ``scanner`` is ``"auto"`` to use :mod:`pytracer.leaks.scanner` when it imports,
    ``None`` to skip leak metrics, or an object with ``scan(snapshot)``.

    The kernel maps are read during every scrape.  The leak scan (sock_diag
    over every namespace, /proc, tcp_info) costs far more on a busy host
    (seconds at 100,000 sockets), so after :meth:`start` it runs in a thread
    of its own every ``leak_interval`` seconds (stretched to four times its
    own duration, so it never takes more than a quarter of a CPU), and a
    scrape uses its latest report; ``pytracer_leak_scan_age_seconds`` says
    how old that is.  Without :meth:`start` (or with ``leak_interval=0``)
    each scrape scans.
    """

    def __init__(
        self,
        tracer: Any,
        opts: ExportOptions | None = None,
        scanner: Any = "auto",
        thresholds: Mapping[str, Any] | None = None,
        bpf_stats: bool = False,
        leak_interval: float = DEFAULT_LEAK_INTERVAL,
        seed_failed: int = 0,
    ) -> None:
        self.tracer = tracer
        # Failed inserts (seeding's too) by time, for pytracer_socket_table_full.
        self._fill = FillTracker(time.monotonic_ns())
        self._seed_failed = seed_failed
        self.leak_interval = leak_interval
        # Held around every read of the tracer's maps (scrape and scan thread)
        # so close() can wait for them before the tracer frees its maps.
        self._maps_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._report: Any = None
        self._report_mono = 0.0
        self.leak_scans = 0
        self.leak_scan_seconds: float | None = None
        self.opts = opts or ExportOptions()
        self.thresholds = dict(thresholds or {})
        self.bpf_stats_held = bpf_stats
        self._scanner = scanner
        self._scanner_ready = scanner != "auto"
        self._lock = threading.Lock()
        self._closed = False
        self.read_errors: dict[str, int] = {w: 0 for w in READS}
        # A scrape that scans reads the socket table into the same arrays
        # every time (as `tracer watch` does): fresh ones cost a page fault
        # per 4 KiB the kernel writes, ~0.1 s of a ~0.5 s scrape at 1M
        # sockets.  Only collect() reads into them, one scrape at a time
        # (self._lock); the scan thread reads its own.  (A scrape that only
        # counts keeps the nursery's mapping here.)
        self._sock_buffers: Any = None
        self._services_cache: dict[int, Any] = {}  # see pytracer.table.services.read
        self.label_overflow: dict[str, int] = {"comm": 0, "destination": 0}
        self.scrapes = 0
        self.last_scrape_seconds: float | None = None
        self._last_logged: dict[str, float] = {}

    def describe(self) -> list[Metric]:
        # Registering must not scrape the kernel.
        return []

    def start(self) -> None:
        """Run leak scans in the background (see the class docstring)."""
        if self.leak_interval <= 0 or self._thread is not None or self._scanner_obj() is None:
            return
        self._thread = threading.Thread(target=self._scan_loop, name="pytracer-leak-scan", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse further reads; waits for a scrape or scan in flight (the
        tracer is about to be closed and its map fds with it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        got = self._maps_lock.acquire(timeout=timeout)
        self._closed = True
        if got:
            self._maps_lock.release()

    def _scan_loop(self) -> None:
        from pytracer.leaks.cadence import LEAK_DUTY
        from pytracer.table import poll as poller

        scanner = self._scanner
        # Ends with close(); each round waits at least 50 ms.
        while not self._stop.is_set():
            t0 = time.monotonic()
            snap = None
            with self._maps_lock:
                if self._closed:
                    return
                try:
                    snap = poller.snapshot(self.tracer, narrow=True)
                except Exception as exc:  # noqa: BLE001
                    self._failed("leaks", exc)
            if snap is not None:
                self._scan_once(scanner, snap, t0)
                # Not held while waiting: the table read is the size of the
                # table (~5 MB at 100k), and a scrape's reads would sit on top.
                del snap
            spent = time.monotonic() - t0
            period = max(self.leak_interval, spent / LEAK_DUTY)
            self._stop.wait(max(period - spent, 0.05))

    def _scan_once(self, scanner: Any, snap: Any, t0: float) -> Any:
        try:
            rep = scanner.scan(snap)
        except Exception as exc:  # noqa: BLE001 - a broken layer must not stop the exporter
            self._failed("leaks", exc)
            return None
        errors = list(getattr(rep, "errors", None) or [])
        if errors:
            self._failed("leaks", RuntimeError("; ".join(errors[:3])))
        self._report = rep
        self._report_mono = time.monotonic()
        self.leak_scan_seconds = self._report_mono - t0
        self.leak_scans += 1
        return rep

    # -- error accounting --

    def _failed(self, what: str, exc: BaseException) -> None:
        self.read_errors[what] = self.read_errors.get(what, 0) + 1
        now = time.monotonic()
        if now - self._last_logged.get(what, -1e9) >= 60.0:
            self._last_logged[what] = now
            log.warning("reading %s failed (counted in %s_read_errors_total): %s", what, NAMESPACE, exc)

    # -- reads --

    def _scanner_obj(self) -> Any:
        if self._scanner_ready:
            return self._scanner
        self._scanner_ready = True
        self._scanner = None
        try:
            from pytracer.leaks.scanner import Scanner, Thresholds  # noqa: PLC0415 - optional layer
        except ImportError as exc:
            self._failed("leaks", exc)
            return None
        try:
            self._scanner = Scanner(self.tracer, Thresholds(**self.thresholds), pids=self.opts.pids,
                                    incremental=True)
        except Exception as exc:  # noqa: BLE001 - a broken layer must not stop the exporter
            self._failed("leaks", exc)
        return self._scanner

    def _maps(self) -> list[MapStat]:
        out = []
        for name in WATCHED_MAPS:
            try:
                m = self.tracer.map(name)
                # The socket table's capacity includes the nursery in front of it.
                capacity = self.tracer.capacity if name == "socks" else m.max_entries
            except Exception:  # noqa: BLE001 - this backend or version has no such map
                continue
            out.append(MapStat(name, None, capacity))
        return out

    def _programs(self) -> list[ProgramStat]:
        out = []
        kprobe = getattr(self.tracer, "kprobe_misses", lambda: None)() or {}
        for p in self.tracer.programs():
            info = p.info()
            out.append(ProgramStat(p.name, int(info.run_time_ns), int(info.run_cnt), int(info.recursion_misses),
                                   kprobe.get(p.name)))
        return out

    def read(self) -> ScrapeInput:
        """One scrape's reads.  Never raises: failures are counted."""
        from pytracer.table import poll as poller
        from pytracer.table import reads

        inp = ScrapeInput()
        if self._closed:
            return inp
        t0 = time.perf_counter()
        totals = socks = keys = None
        records: int | None = None
        scanner = self._scanner_obj()
        try:
            totals = poller.read_totals(self.tracer)
        except Exception as exc:  # noqa: BLE001
            self._failed("agg", exc)
        try:
            if self._sock_buffers is None:
                self._sock_buffers = reads.SockBuffers(keep_walk=True)
            if self._thread is not None or scanner is None:
                # The metrics need only the live records per state: counted a
                # chunk at a time, the table is never held (the scan thread
                # reads its own).
                inp.table_states, records = reads.count_socks(self.tracer, self._sock_buffers)
            else:  # this scrape scans: the whole table
                keys, socks = reads.read_socks(self.tracer, self._sock_buffers, narrow=True)
                records = len(socks)
        except Exception as exc:  # noqa: BLE001
            self._failed("socks", exc)
        try:
            from pytracer.table import services  # noqa: PLC0415 - as poller above

            inp.services = services.read(self.tracer, self._services_cache)
        except Exception as exc:  # noqa: BLE001
            self._failed("services", exc)
        mono = time.monotonic_ns()
        inp.totals, inp.socks = totals, socks
        if totals is not None and records is not None:
            inp.table = self._fill.update(mono, records, int(getattr(self.tracer, "capacity", 0)),
                                          failed_inserts(totals) + self._seed_failed)
        inp.poll_seconds = time.perf_counter() - t0

        try:
            inp.maps = self._maps()
            for m in inp.maps:
                if m.name == "socks":
                    m.entries = records
                else:
                    m.entries = self.tracer.map(m.name).dump(self.tracer.map(m.name).value_size)[2]
        except Exception as exc:  # noqa: BLE001
            self._failed("maps", exc)
        try:
            inp.programs = self._programs()
        except Exception as exc:  # noqa: BLE001
            self._failed("programs", exc)
        inp.bpf_stats = self.bpf_stats_held or bpf_stats_enabled()

        if self._thread is not None:
            inp.leaks = self._report
        elif scanner is not None and totals is not None and socks is not None:
            snap = poller.Snapshot(mono, time.time(), totals, keys, socks, inp.poll_seconds, src=self.tracer,
                                   services=inp.services)
            inp.leaks = self._scan_once(scanner, snap, time.monotonic())

        inp.build = {
            "version": __version__,
            "backend": str(getattr(self.tracer, "backend", "unknown")),
            "kernel": platform.release(),
        }
        for hook, ch in sorted(getattr(self.tracer, "choices", {}).items()):
            if not ch.kind:
                inp.hooks.append((hook, "none", ""))
            for prog in ch.programs:
                inp.hooks.append((hook, ch.kind, prog))
        return inp

    def collect(self) -> list[Metric]:
        with self._lock:
            t0 = time.perf_counter()
            fams: list[Metric] = []
            if not self._closed:
                try:
                    with self._maps_lock:
                        inp = self.read()
                    fams, folded = build_families(inp, self.opts)
                    for label, n in folded.items():
                        self.label_overflow[label] = self.label_overflow.get(label, 0) + n
                except Exception as exc:  # noqa: BLE001 - a scrape never raises
                    self._failed("collect", exc)
                    fams = []
            self.scrapes += 1
            fams += self._self_families(time.perf_counter() - t0)
            return fams

    def _self_families(self, seconds: float) -> list[Metric]:
        ns = NAMESPACE
        errs = CounterMetricFamily(
            f"{ns}_read_errors", "Failed reads (map, programs, leak detectors); each is logged.", labels=["what"]
        )
        for what in sorted(self.read_errors):
            errs.add_metric([what], float(self.read_errors[what]))
        over = CounterMetricFamily(
            f"{ns}_label_overflow",
            "Label values folded into 'other' because of the cardinality cap (--max-comms, --time-wait-top).",
            labels=["label"],
        )
        for label in sorted(self.label_overflow):
            over.add_metric([label], float(self.label_overflow[label]))
        dur = GaugeMetricFamily(f"{ns}_scrape_duration_seconds", "Time this scrape took to read and build.")
        dur.add_metric([], seconds)
        self.last_scrape_seconds = seconds
        out = [errs, over, dur]
        if self._scanner not in (None, "auto"):
            scans = CounterMetricFamily(f"{ns}_leak_scans", "Leak detector scans completed.")
            scans.add_metric([], float(self.leak_scans))
            reaped = CounterMetricFamily(
                f"{ns}_records_reaped",
                "Table records deleted because their socket no longer existed and no transition to CLOSE was seen "
                "(each is logged); their lifetimes are not in the histograms.",
            )
            reaped.add_metric([], float(getattr(self._scanner, "reaped", 0)))
            out += [scans, reaped]
        if self.leak_scan_seconds is not None:
            sd = GaugeMetricFamily(f"{ns}_leak_scan_duration_seconds", "Time the last leak scan took.")
            sd.add_metric([], self.leak_scan_seconds)
            age = GaugeMetricFamily(
                f"{ns}_leak_scan_age_seconds", "Age of the leak report the leak metrics come from."
            )
            age.add_metric([], time.monotonic() - self._report_mono)
            out += [sd, age]
        return out

