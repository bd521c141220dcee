"""Plumbing for the benchmark harness: processes, /proc readings, bpf_stats.

Everything that starts a process here hands back an object whose ``stop()``
ends exactly that process (by pid), and every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import resource
import shutil
import signal
import statistics
import subprocess
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent  # bench/harness: the host-side scripts
BENCH = HERE.parent
REPO = BENCH.parent
GUEST = BENCH / "guest"  # what runs inside the test VM
RESULTS = BENCH / "results"  # results.json, vm.json, the PNGs
BUILD = BENCH / "build"  # compiled helpers (gitignored)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# BENCH_TRACER runs another build (e.g. a source tree's wrapper) without installing it.
TRACER = os.environ.get("BENCH_TRACER") or shutil.which("tracer") or "/usr/local/bin/tracer"


def _tracer_python(tracer: str) -> str:
    """The Python that runs `tracer` (its script's #! line), so the in-process
    helpers (pollcycle.py, fdscan.py) measure the same install as the CLI."""
    try:
        with open(tracer, "rb") as f:
            first = f.readline(256)
    except OSError:
        first = b""
    if first.startswith(b"#!"):
        interp = first[2:].split()
        if interp and Path(interp[0].decode()).name.startswith("python") and os.access(interp[0], os.X_OK):
            return interp[0].decode()
    return "/opt/pytracer/venv/bin/python"


VENV_PY = os.environ.get("BENCH_PYTHON") or _tracer_python(TRACER)


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- numbers ---------------------------------------------------------------


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min, max and n of a list (empty-safe)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


# -- build -----------------------------------------------------------------


def build_c(name: str) -> str:
    """bench/harness/NAME.c built into bench/build/NAME when missing or older than its source."""
    BUILD.mkdir(exist_ok=True)
    out = BUILD / name
    src = HERE / f"{name}.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)], check=True)
    return str(out)


def build_bpf(name: str) -> bytes:
    """bench/harness/NAME.bpf.c built (CO-RE, against bpf/) into bench/build/NAME.bpf.o when missing or
    older than its source; the object's bytes."""
    BUILD.mkdir(exist_ok=True)
    out = BUILD / f"{name}.bpf.o"
    src = HERE / f"{name}.bpf.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
                        f"-I{REPO / 'bpf'}", "-c", str(src), "-o", str(out)], check=True, timeout=120)
    return out.read_bytes()


def build_churn() -> str:
    return build_c("churn")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def start_nginx(d: Path, port: int, keepalive: bool = True) -> Proc:
    """nginx with one worker answering "ok" on 127.0.0.1:PORT, its files in
    directory d; returned once it answers and its worker runs."""
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;{"" if keepalive else chr(10) + "  keepalive_timeout 0;"}
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 "ok\\n"; }} }}
}}
""")
    p = Proc(["nginx", "-c", str(conf), "-p", str(d)], name="nginx", stdin=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            if children(p.pid):
                return p
        except OSError:
            pass
        time.sleep(0.1)
    p.stop()
    raise BenchError(f"nginx did not answer on port {port}: {p.stderr[-300:]}")


# -- processes -------------------------------------------------------------


def unwind_on_signals() -> None:
    """Make SIGTERM, and SIGINT even where it arrives ignored (a job started
    in the background of a script), unwind like Ctrl-C: every ``finally``
    then stops what it started, instead of leaving a tracer attached."""
    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


class Proc:
    """A subprocess whose stdout lines are collected by a thread (JSON decoded
    when they look like JSON).  stop() signals this pid only."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, stdin: bool = True,
                 stdout_file: str | None = None, name: str = "") -> None:
        self.name = name or os.path.basename(argv[0])
        self.argv = argv
        self.t_start = time.monotonic()
        out = open(stdout_file, "w") if stdout_file else subprocess.PIPE  # noqa: SIM115
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[tuple[float, Any]] = queue.Queue()
        self.all: list[tuple[float, Any]] = []
        self.stderr = ""
        if self.p.stdout is not None:
            threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.p.pid

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            t = time.monotonic()
            line = line.strip()
            item: Any = line
            if line.startswith("{"):
                try:
                    item = json.loads(line)
                except ValueError:
                    pass
            self.all.append((t, item))
            self.lines.put((t, item))
        self.lines.put((time.monotonic(), None))

    def _read_err(self) -> None:
        assert self.p.stderr is not None
        self.stderr = self.p.stderr.read()

    def next(self, timeout: float) -> tuple[float, Any]:
        try:
            t, item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.name}: no output within {timeout:.0f}s") from None
        if item is None:
            self.p.wait(timeout=5)
            time.sleep(0.1)
            raise BenchError(f"{self.name} exited ({self.p.returncode}): {self.stderr.strip()[-400:]}")
        return t, item

    def wait_for(self, pred, timeout: float) -> tuple[float, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: expected output not seen within {timeout:.0f}s")
            t, item = self.next(left)
            if pred(item):
                return t, item

    def send(self, text: str = "go\n") -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text)
        self.p.stdin.flush()

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"{self.name}: did not finish within {timeout:.0f}s") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.p.poll() is None:
            try:
                os.kill(self.p.pid, sig)
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=5)
            except ProcessLookupError:
                pass
        if self.p.stdin:
            try:
                self.p.stdin.close()
            except OSError:
                pass
        return self.p.returncode

    def json_lines(self) -> list[dict[str, Any]]:
        return [x for _, x in self.all if isinstance(x, dict)]


@contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()


def start_tracer(*args: str, interval: float = 1.0, attach: str | None = None, timeout: float = 120) -> Proc:
    """`tracer watch --json` (or another subcommand via args), attached on return."""
    argv = [TRACER]
    if attach:
        argv += ["--attach", attach]
    if args and args[0] == "export":
        argv += list(args)
        p = Proc(argv, name="tracer-export")
        return p
    argv += ["watch", "--json", "--interval", str(interval), "--top", "0", *args]
    p = Proc(argv, name="tracer-watch")
    try:
        p.wait_for(lambda x: isinstance(x, dict), timeout)  # first report: attached
    except BaseException:
        p.stop()
        raise
    return p


def start_bpftrace(script: Path, *args: str, timeout: float = 60, out: str | None = None) -> Proc:
    """bpftrace with its BEGIN probe printing "ready"; returns once attached."""
    argv = ["bpftrace", "-q", "-f", "json", str(script), *args] if out is None else \
        ["bpftrace", "-q", str(script), *args]
    p = Proc(argv, name="bpftrace", stdout_file=None)
    try:
        p.wait_for(lambda x: x == "ready" or (isinstance(x, dict) and x.get("data") == "ready\n")
                   or (isinstance(x, dict) and x.get("type") == "printf" and "ready" in str(x.get("data"))),
                   timeout)
    except BaseException:
        p.stop()
        raise
    return p


# -- /proc and bpf ---------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def bpf_ids(pid: int, kind: str = "prog") -> list[int]:
    """The BPF program (or map) ids a process holds open, from fdinfo."""
    ids = []
    key = f"{kind}_id:"
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return ids
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith(key):
                        ids.append(int(line.split()[1]))
        except OSError:
            continue
    return sorted(set(ids))


def loaded_progs(proc: Proc, timeout: float = 120, settle: float = 5) -> list[int]:
    """The BPF program ids ``proc`` holds, once it has loaded some and
    ``settle`` seconds more have passed (attached and seeded by then)."""
    deadline = time.monotonic() + timeout
    while not bpf_ids(proc.pid):
        if time.monotonic() > deadline or proc.p.poll() is not None:
            raise BenchError(f"{proc.name} did not load its programs: {proc.stderr[-300:]}")
        time.sleep(0.2)
    time.sleep(settle)
    return bpf_ids(proc.pid)


def _bpftool_json(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True, timeout=30).stdout
    return json.loads(out)


def prog_stats(ids: list[int]) -> dict[int, dict[str, Any]]:
    """id -> {name, run_time_ns, run_cnt} for those programs."""
    out = {}
    for p in _bpftool_json("prog", "show"):
        if p["id"] in ids:
            out[p["id"]] = {"name": p.get("name", ""), "run_time_ns": p.get("run_time_ns", 0),
                            "run_cnt": p.get("run_cnt", 0)}
    return out


def map_memory(ids: list[int]) -> dict[str, int]:
    return {m.get("name", str(m["id"])): m.get("bytes_memlock", 0) for m in _bpftool_json("map", "show")
            if m["id"] in ids}


@contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    """BPF run-time statistics on while inside, through BPF_ENABLE_STATS.

    The kernel counts while any such fd is open, so overlapping users (two
    benchmarks, a test run, `tracer export --bpf-stats`) never switch each
    other off or leave statistics on: the fd closes with this process, even
    when it is killed.  The kernel.bpf_stats_enabled sysctl is not touched.
    (pytracer.exporter.collector.BpfStats is its twin in the product; the
    harness runs under the system Python, without pytracer's packages.)
    """
    import ctypes

    class Attr(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 116)]

    libc = ctypes.CDLL(None, use_errno=True)
    attr = Attr(type=0)  # BPF_STATS_RUN_TIME
    fd = libc.syscall(321, 32, ctypes.byref(attr), ctypes.sizeof(attr))  # __NR_bpf (x86-64), BPF_ENABLE_STATS
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS: " + os.strerror(ctypes.get_errno()))
    try:
        yield
    finally:
        os.close(fd)


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    libbpf = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libbpf1"], capture_output=True, text=True).stdout
    bpftrace = subprocess.run(["bpftrace", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "kernel": os.uname().release,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "os": _os_release(),
        "libbpf": libbpf,
        "bpftrace": bpftrace,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
        return re.search(r'PRETTY_NAME="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return "?"


# -- scale limits ----------------------------------------------------------

# Measured here with 1M idle loopback sockets: ~4.7 KiB of slab each (tcp_sock, file, dentry, inode,
# epoll-less), plus the tracers (watch ~0.9 GiB, export ~0.4 GiB, the poll loop and the socks map at 1M).
# A size is refused when MemAvailable is below this many KiB per socket.
KIB_PER_SOCKET_NEEDED = 8


def meminfo_kib() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def _sysctl(name: str) -> list[int]:
    try:
        return [int(x) for x in Path("/proc/sys", *name.split(".")).read_text().split()]
    except (OSError, ValueError):
        return []


def scale_limits() -> dict[str, Any]:
    """The kernel and process limits that decide how many live sockets the scale
    section can hold, and how many connections one `churn hold` may take.

    RLIMIT_NOFILE: a holder keeps 2 fds per connection.  Raising the hard limit
    (up to fs.nr_open) needs CAP_SYS_RESOURCE; where that is allowed this process
    raises its own, the holders inherit it and churn sets soft = hard, so fewer
    holders are needed.  Ephemeral ports: a holder connects 127.0.0.1 -> its own
    127.0.x.y:port, so one 4-tuple family, at most ip_local_port_range ports.
    """
    nr_open = (_sysctl("fs.nr_open") or [1 << 20])[0]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(nr_open, 1 << 20)
    raised = False
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, want))
            hard, raised = want, True
        except (OSError, ValueError):
            pass
    ports = _sysctl("net.ipv4.ip_local_port_range") or [32768, 60999]
    port_range = ports[1] - ports[0] + 1
    per_holder = max(1, min((hard - 64) // 2, port_range - 1000))
    mem = meminfo_kib()
    return {
        "nofile_hard": hard,
        "nofile_raised": raised,
        "fs.nr_open": nr_open,
        "fs.file-max": (_sysctl("fs.file-max") or [0])[0],
        "net.ipv4.ip_local_port_range": ports,
        "port_range_size": port_range,
        "net.ipv4.tcp_max_orphans": (_sysctl("net.ipv4.tcp_max_orphans") or [0])[0],
        "net.ipv4.tcp_max_tw_buckets": (_sysctl("net.ipv4.tcp_max_tw_buckets") or [0])[0],
        "net.ipv4.tcp_mem": _sysctl("net.ipv4.tcp_mem"),
        "net.core.somaxconn": (_sysctl("net.core.somaxconn") or [0])[0],
        "kernel.pid_max": (_sysctl("kernel.pid_max") or [0])[0],
        "mem_available_kib": mem.get("MemAvailable", 0),
        "connections_per_holder": per_holder,
    }


def scale_refusal(sockets: int, lim: dict[str, Any]) -> str | None:
    """Why this host cannot hold ``sockets`` live sockets now (None: it can).
    Every socket is one fd; idle sockets hold no tcp_mem pages (no queued data);
    tcp_max_orphans and tcp_max_tw_buckets only matter at teardown (overflow is
    dropped by the kernel, not an error)."""
    fm = lim["fs.file-max"]
    if fm and fm < sockets + 50000:
        return f"fs.file-max is {fm:,}"
    need = sockets * KIB_PER_SOCKET_NEEDED
    avail = meminfo_kib().get("MemAvailable", 0)
    if avail < need:
        return f"MemAvailable {avail / 2**20:.1f} GiB < {need / 2**20:.1f} GiB needed"
    holders = -(-sockets // 2 // lim["connections_per_holder"])
    if holders > 250 * 200:
        return f"{holders} holders would need more 127.0.x.y addresses than the harness hands out"
    return None
