"""Kernel-tier fixtures: real processes, network namespaces, a bpftrace oracle.

Everything started here is torn down by finalizers, and every wait has a
deadline.  Assertions in the tests are scoped to the tests' own processes
(the tracer's --pid filter) and ports, so other traffic on the host cannot
change an outcome.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from .soak import stop_bpftrace

# Inside the kernel test VMs (vagrant/host/run-vm sets it): QEMU without KVM, on
# a shared host, where a vCPU can stall for tens of milliseconds.
IN_VM = os.environ.get("PYTRACER_IN_VM") == "1"
# How far the kernel's timestamps may sit from the workload's own clock
# readings around the same syscall.
CLOCK_TOLERANCE_S = 0.060 if IN_VM else 0.005

# Classic tracepoint and kprobe programs (ours in those attach modes, and
# bpftrace's) are skipped when their event fires in an interrupt while any
# BPF program runs on the same CPU.  Kernels from 6.7 count each skip in the
# program's recursion_misses; older ones drop it silently.  Measured in the
# test VMs (6.1, TCG, loaded host): 2 in 1,000 with one tracer, 2 in 300 with
# six tracers and bpftrace side by side (more BPF programs running, more
# chances to nest).  On those kernels, counts from classic programs may fall
# short by this fraction, and no more.
CLASSIC_SKIPS_COUNTED = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2]) >= (6, 7)


# Open issue: about once in 2,000-60,000 connections under heavy load on the
# dev host (6.18, tp_btf), a passive socket's last events (FIN_WAIT1 ->
# FIN_WAIT2 -> CLOSE) never reach any program, with no recursion
# miss counted, and its record stays; bpftrace's own tracepoint program
# misses the same pair.  Until it is explained, a burst may leave one such
# record per 1,000 connections, and the tests print it.
STALE_PER_BURST = 1


def skip_allowance(classic: bool, n: int, counted_misses: int = 0, fraction: float = 0.005,
                   kprobe: bool = False) -> int:
    """How far below n a count of n events may fall: the skips the kernel
    counted, plus, where the kernel does not count them in the program,
    ``fraction`` of n, plus the open issue above for bursts of 1,000 or more.

    A kprobe that fires while another kprobe's handler runs on the same CPU
    (an interrupt's softirq inside our tcp_close kprobe, say) is missed by
    the kprobes core before any BPF program runs (kernel/kprobes.c,
    kprobes_inc_nmissed_count()): counted with the kprobe, never in the
    program's recursion_misses, on every kernel.  Seen once in 1,200 events
    on 6.12 (TCG) with five tracers and bpftrace side by side."""
    stale = STALE_PER_BURST if n >= 1000 else 0
    if not classic or (CLASSIC_SKIPS_COUNTED and not kprobe):
        return counted_misses + stale
    return counted_misses + stale + int(n * fraction)

KERNEL = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])


def kprobe_misses(tracer: Any) -> dict[str, int] | None:
    """A tracer's kprobe misses (Tracer.kprobe_misses), None where the
    kernel or the backend does not say."""
    read = getattr(tracer, "kprobe_misses", None)
    return None if read is None else read()


def kprobe_delta(before: dict[str, int] | None, after: dict[str, int] | None, n: int) -> int | None:
    """Kprobe hits skipped between two kprobe_misses() reads of a burst of
    ``n`` events; None when either read could not say.  No more than the
    burst's events: a count read from the wrong place would be no bound."""
    if before is None or after is None:
        return None
    missed = sum(after.values()) - sum(before.values())
    assert 0 <= missed <= 10 * n, (before, after)
    return missed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKLOAD = HERE / "workload.py"
PYTHON = sys.executable


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if str(item.fspath).startswith(str(HERE)):
            item.add_marker(pytest.mark.kernel)


class Proc:
    """A subprocess speaking JSON lines on stdout, driven by lines on stdin."""

    def __init__(self, argv: list[str], netns: str | None = None, name: str = "proc") -> None:
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.name = name
        self.p = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        # Under `ip netns exec` the workload is exec'd in place: same pid.
        return self.p.pid

    def expect(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} within {timeout}s; stderr: {self.stderr()}")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise RuntimeError(f"{self.name} exited before {event!r}: {self.stderr()}")
            self.events.append(msg)
            if msg.get("event") == event or msg.get("name") == event:
                return msg

    def drain(self, timeout: float = 5.0) -> None:
        """Collect every remaining event until the process's stdout closes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                return
            if msg is None:
                return
            self.events.append(msg)

    def send(self, line: str = "go") -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def stderr(self) -> str:
        if self.p.poll() is None:
            return ""
        return (self.p.stderr.read() if self.p.stderr else "")[-2000:]

    def wait(self, timeout: float = 60.0) -> int:
        return self.p.wait(timeout=timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=10)


@pytest.fixture
def procs() -> Iterator[Any]:
    started: list[Proc] = []

    def start(role: str, *args: Any, netns: str | None = None) -> Proc:
        proc = Proc([PYTHON, str(WORKLOAD), role, *map(str, args)], netns=netns, name=role)
        started.append(proc)
        proc.expect("ready")
        return proc

    yield start
    for proc in started:
        proc.kill()


@dataclass
class NetnsPair:
    """Two namespaces joined by a veth pair, IPv4 and IPv6 on both ends."""

    a: str
    b: str
    a4: str
    b4: str
    a6: str
    b6: str
    created: list[str] = field(default_factory=list)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    tag = f"{os.getpid() % 10000}{random.randint(100, 999)}"
    n = random.randint(1, 250)
    pair = NetnsPair(
        a=f"ptt{tag}a", b=f"ptt{tag}b", a4=f"10.{n}.77.1", b4=f"10.{n}.77.2",
        a6=f"fd00:{n:x}:77::1", b6=f"fd00:{n:x}:77::2",
    )
    try:
        for ns in (pair.a, pair.b):
            _ip("netns", "add", ns)
            pair.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        va, vb = f"va{tag}"[:15], f"vb{tag}"[:15]
        _ip("link", "add", va, "netns", pair.a, "type", "veth", "peer", "name", vb, "netns", pair.b)
        for ns, dev, a4, a6 in ((pair.a, va, pair.a4, pair.a6), (pair.b, vb, pair.b4, pair.b6)):
            _ip("-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            _ip("-n", ns, "-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        yield pair
    finally:
        for ns in pair.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


STOP_WAIT_S = 180 if IN_VM else 30  # bpftrace's exit after SIGINT


class Oracle:
    """An independent bpftrace script on the inet_sock_set_state tracepoint.

    Prints one line per TCP transition involving ``port``; the tests compare
    the tracer's counts and transitions with it.
    """

    def __init__(self, port: int, count_only: bool = False) -> None:
        self.count_only = count_only
        # BEGIN runs once every probe is attached: wait for it, not "Attaching".
        # count_only aggregates in a bpftrace map (lossless at any rate)
        # instead of printing each event through the perf buffer.
        action = (
            "@t[0, args->oldstate, args->newstate, 0, 0] = count();"
            if count_only else
            'printf("T %llx %d %d %d %d\\n", args->skaddr, args->oldstate, args->newstate, '
            "args->sport, args->dport);"
        )
        prog = (
            'BEGIN { printf("READY\\n"); } '
            "tracepoint:sock:inet_sock_set_state /args->protocol == 6 && "
            f"(args->sport == {port} || args->dport == {port})/ "
            "{ " + action + " }"
        )
        if count_only:
            prog += ' END { print(@t); clear(@t); }'

        self.p = subprocess.Popen(
            ["bpftrace", "-B", "line", "-e", prog], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.out: list[str] = []
        self.errors: list[str] = []
        self._attached = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._attached.wait(60):
            self.p.kill()
            raise RuntimeError(f"bpftrace did not attach within 60s: {''.join(self.errors)[-500:]}")

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            if not line.startswith(("T ", "@t[")):
                self.errors.append(line)
            if line.startswith("READY"):
                self._attached.set()
            elif line.startswith("T ") or line.startswith("@t["):
                self.out.append(line)

    def stop(self) -> list[tuple[int, int, int, int, int]]:
        time.sleep(0.3)  # let the last lines drain
        # bpftrace prints its maps only after detaching, which is slow under
        # emulation with other guests on the host: give it time there.
        self.how = stop_bpftrace(self.p, STOP_WAIT_S)
        self.killed = self.how == "killed"
        # The process has exited, but its last lines (the maps END prints)
        # may still be in the pipe: read to EOF before counting.
        self._reader.join(timeout=30)
        if self.count_only and not any(line.startswith("@t[") for line in self.out):
            raise RuntimeError(f"bpftrace oracle gave no counts (stopped by {self.how}, {STOP_WAIT_S}s in all, "
                               f"exit {self.p.returncode}): {''.join(self.errors)[-500:]}")
        rows = []
        for line in self.out:
            if line.startswith("@t["):
                # "@t[0, 7, 2, 0, 0]: 10000": one row per counted event.
                key, n = line[3:].split("]:")
                _, old, new, _, _ = (int(x) for x in key.split(","))
                rows.extend([(0, old, new, 0, 0)] * int(n))
                continue
            _, sk, old, new, sport, dport = line.split()
            rows.append((int(sk, 16), int(old), int(new), int(sport), int(dport)))
        return rows


@pytest.fixture
def oracle() -> Iterator[Any]:
    if not shutil.which("bpftrace"):
        pytest.fail("bpftrace is required for the kernel tier (apt install bpftrace)")
    started: list[Oracle] = []

    def start(port: int, count_only: bool = False) -> Oracle:
        o = Oracle(port, count_only)
        started.append(o)
        return o

    yield start
    for o in started:
        if o.p.poll() is None:
            o.p.kill()


def tracer_cmd() -> list[str]:
    exe = shutil.which("tracer")
    return [exe] if exe else [PYTHON, "-m", "pytracer"]


def attached_prog_ids() -> set[int]:
    """IDs of loaded BPF programs named like ours (bpftool as the witness)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=30)
    ids = set()
    for prog in json.loads(out.stdout or "[]"):
        name = prog.get("name", "")
        if re.match(r"(state|accept|close|reset)_", name):
            ids.add(prog["id"])
    return ids


def fdinfo_ids(pid: int, key: str) -> set[int]:
    """prog_id / link_id values in /proc/PID/fdinfo (what the process holds)."""
    ids = set()
    base = f"/proc/{pid}/fdinfo"
    try:
        names = os.listdir(base)
    except OSError:
        return ids
    for name in names:
        try:
            with open(f"{base}/{name}") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def prog_ids_of(pid: int) -> set[int]:
    """BPF program ids held by a process."""
    return fdinfo_ids(pid, "prog_id")


def live_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=30)
    return {p["id"] for p in json.loads(out.stdout or "[]")}


def live_link_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, timeout=30)
    return {int(x["id"]) for x in json.loads(out.stdout or "[]")}


def live_map_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True, timeout=30)
    return {int(m["id"]) for m in json.loads(out.stdout or "[]")}


def gone(progs: set[int], links: set[int] = frozenset(), timeout: float = 10, maps: set[int] = frozenset()) -> bool:
    """Every program, link and map in the sets freed (bpftool as the
    witness)?  The kernel frees a program a little after its last fd closes
    (deferred work), so a check made right at a process's exit may still see
    it; the program drops its maps later still, from a workqueue after an
    RCU grace period (kernel/bpf/core.c, bpf_prog_free_deferred())."""
    deadline = time.monotonic() + timeout
    while True:
        if (not (progs & live_prog_ids()) and not (links and links & live_link_ids())
                and not (maps and maps & live_map_ids())):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@pytest.fixture
def bpf_stats() -> Any:
    """BPF run-time statistics (run_time_ns, run_cnt) on for the test.

    Through BPF_ENABLE_STATS, so a concurrent test run or benchmark never
    switches them off under this one, and the kernel.bpf_stats_enabled
    sysctl is never left on by an interrupted run.
    """
    from pytracer.exporter.collector import BpfStats

    with BpfStats():
        yield


def lifetime_ranges(
    conns: list[dict[str, Any]], server_events: list[dict[str, Any]]
) -> dict[Any, list[tuple[float, float]]]:
    """Ground truth for the client/server workload, from the processes'
    clocks (CLOCK_MONOTONIC, one clock for the machine): for each connection
    and direction, the (shortest, longest) lifetime the kernel can report.

    The client closes first.  The passive child reaches CLOSE once the server
    closes it (its FIN is ACKed at once on loopback and veth); it was born
    when the handshake completed, just before connect() returned
    (t_established).  The active socket was born inside connect() (just after
    t_connect); it reaches CLOSE when its FIN is ACKed and it turns into a
    timewait socket -- right after the client's close() (t_close) -- or at
    the latest when the server's FIN arrives.  On a fast machine the two are
    microseconds apart; under emulation, the server's close can lag."""
    from pytracer.kernel.abi import Direction  # noqa: PLC0415 - conftest stays light

    closed = {e["rport"]: e["t"] for e in server_events if e.get("event") == "closed"}
    return {
        Direction.ACTIVE: [(c["t_close"] - c["t_connect"], closed[c["lport"]] - c["t_connect"]) for c in conns],
        Direction.PASSIVE: [(closed[c["lport"]] - c["t_established"],) * 2 for c in conns],
    }


def check_lifetimes(h: Any, ranges: list[tuple[float, float]], tol: float) -> list[str]:
    """Problems with histogram ``h`` against the (shortest, longest) ground
    truth of each connection: its count, its exact sum, and each lifetime's
    slot (matched greedily, one slot per connection, a slot's neighbours
    allowed for the clocks' tolerance)."""
    from pytracer.kernel.histogram import slot_of  # noqa: PLC0415

    out = []
    if h.count != len(ranges):
        out.append(f"count {h.count}, want {len(ranges)}")
    lo = sum(a for a, _ in ranges) - tol * len(ranges)
    hi = sum(b for _, b in ranges) + tol * len(ranges)
    if not lo <= h.sum_us / 1e6 <= hi:
        out.append(f"sum {h.sum_us / 1e6:.6f}s outside [{lo:.6f}, {hi:.6f}]")
    slots = sorted(i for i, c in enumerate(h.slots) for _ in range(c))
    for a, b in sorted(ranges, key=lambda r: r[1]):
        lo_s, hi_s = slot_of(int(max(a - tol, 0) * 1e6)) - 1, slot_of(int((b + tol) * 1e6)) + 1
        match = next((s for s in slots if lo_s <= s <= hi_s), None)
        if match is None:
            out.append(f"no lifetime in slots {lo_s}..{hi_s} for ({a:.6f}, {b:.6f})s; slots {slots}")
        else:
            slots.remove(match)
    return out
