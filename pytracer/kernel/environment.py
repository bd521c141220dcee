"""What the running kernel and process can do: probes, mounts, privileges.

Everything here is cheap and read-only, except :func:`ensure_mounts`, which
mounts tracefs and bpffs when they are missing (tracepoint attach needs
tracefs; bpffs is where pinned objects would live).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
from dataclasses import dataclass, field

TRACEFS = "/sys/kernel/tracing"
BPFFS = "/sys/fs/bpf"
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

# include/uapi/linux/capability.h
CAP_DAC_READ_SEARCH = 2
CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39


class EnvironmentProblem(RuntimeError):
    """The host cannot run the tracer as asked; the message says what to do."""


def kernel_release() -> str:
    return platform.release()


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or kernel_release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def effective_caps(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has_cap(caps: int, cap: int) -> bool:
    return bool(caps >> cap & 1)


def can_trace(caps: int) -> bool:
    """Tracing programs need CAP_BPF + CAP_PERFMON (v5.8+), or CAP_SYS_ADMIN."""
    return has_cap(caps, CAP_SYS_ADMIN) or (has_cap(caps, CAP_BPF) and has_cap(caps, CAP_PERFMON))


def require_privileges() -> None:
    caps = effective_caps()
    if not can_trace(caps):
        missing = " and ".join(n for n, bit in (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON))
                               if not has_cap(caps, bit))
        raise EnvironmentProblem(
            f"pytracer needs root: missing {missing} (or CAP_SYS_ADMIN) to load its tracing programs; "
            "run it with sudo (docs/privileges.md)"
        )


# What each capability gives pytracer, for `tracer doctor` (docs/privileges.md: the
# same table, with what was observed on a kernel without each one).
CAPABILITY_USES = (
    ("CAP_BPF", CAP_BPF, "load the tracing programs and the fd-scan iterators, read their maps (with CAP_PERFMON)"),
    ("CAP_PERFMON", CAP_PERFMON, "attach tracing programs (with CAP_BPF)"),
    ("CAP_SYS_PTRACE", CAP_SYS_PTRACE, "read other processes' /proc/PID/fd links when the fd scan walks /proc"),
    ("CAP_DAC_READ_SEARCH", CAP_DAC_READ_SEARCH, "list other users' /proc/PID/fd directories when the fd scan "
     "walks /proc"),
    ("CAP_SYS_ADMIN", CAP_SYS_ADMIN, "enter other network namespaces (their socket inventory), use --bpf-stats, "
     "or mount bpffs and tracefs when absent"),
)


def missing_capabilities(caps: int) -> list[str]:
    """One line per capability pytracer uses that ``caps`` lacks, saying what goes missing."""
    return [f"no {name}: cannot {use}" for name, bit, use in CAPABILITY_USES if not has_cap(caps, bit)]


# What goes missing without a capability, said once per run (docs/privileges.md has the table).
NETNS_NOTE = ("no CAP_SYS_ADMIN: sockets in other network namespaces are left out of the inventory "
              "(entering one with setns(2) needs it); the kernel-side counts still include them")


_said: set[str] = set()


def say_once(key: str, line: str) -> None:
    """A warning the run prints once, however many scans meet the cause (logging's
    last-resort handler writes it to stderr when the command configured none)."""
    if key not in _said:
        _said.add(key)
        logging.getLogger("pytracer").warning("%s", line)


def fd_walk_note(caps: int, unreadable: int) -> str:
    """The line for ``unreadable`` /proc/PID/fd tables the walk could not read."""
    missing = [n for n, bit in (("CAP_SYS_PTRACE", CAP_SYS_PTRACE), ("CAP_DAC_READ_SEARCH", CAP_DAC_READ_SEARCH))
               if not has_cap(caps, bit)]
    if not missing:
        return (f"the fd tables of {unreadable} processes are unreadable (permission denied: processes holding "
                "capabilities this one lacks), so their sockets show no owner")
    return (f"no {' and no '.join(missing)}: the fd tables of {unreadable} processes are unreadable, so their "
            "sockets show no owner (reading other users' /proc/PID/fd needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)")


def _mounted(path: str, fstype: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == path and line.split()[2] == fstype for line in f)
    except OSError:
        return False


def _mount(source: str, target: str, fstype: str) -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def ensure_mounts() -> dict[str, str]:
    """Mount tracefs and bpffs if missing.  Returns path -> what happened."""
    out = {}
    for path, fstype in ((TRACEFS, "tracefs"), (BPFFS, "bpf")):
        if _mounted(path, fstype):
            out[path] = "mounted"
            continue
        if fstype == "tracefs" and os.path.isdir(os.path.join(path, "events")):
            out[path] = "available"
            continue
        err = _mount(fstype, path, fstype)
        out[path] = "mounted by pytracer" if err is None else f"not mounted ({err})"
    return out


@dataclass
class Features:
    """Kernel facts that decide which programs can run."""

    release: str
    version: tuple[int, int]
    btf: bool
    tracefs: bool
    kprobes: bool
    tracepoints: dict[str, bool] = field(default_factory=dict)
    bpf_stats: bool | None = None

    @property
    def tp_btf(self) -> bool:
        return self.btf and self.version >= (5, 5)

    @property
    def fentry(self) -> bool:
        return self.btf and self.version >= (5, 5)

    @property
    def cookie_in_tracing(self) -> bool:
        # bpf_get_socket_cookie() for BTF sock pointers: v5.12 (c5dbb89fc2ac).
        return self.version >= (5, 12)

    def tracepoint(self, category: str, name: str) -> bool:
        return self.tracepoints.get(f"{category}/{name}", False)


TRACEPOINTS = (
    "sock/inet_sock_set_state",
    "tcp/tcp_receive_reset",
    "syscalls/sys_exit_accept4",
    "syscalls/sys_exit_accept",
    "syscalls/sys_enter_close",
    "sched/sched_process_fork",  # the opt-in "follow" hook (tracer run)
    "sched/sched_process_exit",
)


def probe_features() -> Features:
    release = kernel_release()
    events = os.path.join(TRACEFS, "events")
    tracefs = os.path.isdir(events)
    kprobes = os.path.exists("/sys/bus/event_source/devices/kprobe/type") or os.path.exists(
        os.path.join(TRACEFS, "kprobe_events")
    )
    stats = None
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            stats = f.read().strip() == "1"
    except OSError:
        pass
    return Features(
        release=release,
        version=kernel_version(release),
        btf=os.path.exists(VMLINUX_BTF),
        tracefs=tracefs,
        kprobes=kprobes,
        tracepoints={tp: os.path.isdir(os.path.join(events, tp)) for tp in TRACEPOINTS},
        bpf_stats=stats,
    )


# mallopt(3) parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc(threshold: int = 128 * 1024) -> bool:
    """Give buffers of ``threshold`` bytes and more back to the kernel when
    they are freed.

    Each poll and leak scan allocates and frees arrays of a few hundred KB
    to tens of MB (socket tables, sock_diag dumps).  glibc raises its mmap
    threshold after the first such free (up to 32 MB), after which these
    come from the heap and stay resident: RSS ratchets up to the largest
    moment and stays there.  Setting the thresholds explicitly turns that
    adjustment off.  Best effort: False where mallopt is missing (not glibc).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))


def give_back_heap() -> bool:
    """Return the free pages at the top and in the middle of the malloc
    heap to the kernel (glibc ``malloc_trim``), after a phase that made and
    freed many small buffers among longer-lived objects: seeding at 100k
    sockets leaves ~3 MiB of such pages resident, and the next phase's peak
    stands on them.  Big arrays are mmapped and go back when freed
    (:func:`tune_malloc`); these do not.  Best
    effort: False where there is no malloc_trim (not glibc)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def memlock_limit() -> str:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"


def map_memlock(fd: int) -> int | None:
    """The kernel's account of a BPF map's memory in bytes (its fdinfo's
    "memlock:" line: what a preallocated map reserved, or what one that
    allocates as it fills holds now on 6.4+), or None if unreadable."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# The HZ values Linux is configured with (kernel/Kconfig.hz).
KNOWN_HZ = (100, 250, 300, 1000)


def hz_from_config(text: str) -> int | None:
    """CONFIG_HZ from a kernel config's text, or None."""
    m = re.search(r"^CONFIG_HZ=(\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def hz_from_timer_list(text: str, uptime_s: float) -> int | None:
    """HZ from /proc/timer_list's jiffies and the uptime it was read at.

    jiffies start at INITIAL_JIFFIES = 2**32 - 300 * HZ (include/linux/jiffies.h),
    so jiffies - 2**32 = HZ * (uptime - 300); the nearest known HZ wins."""
    m = re.search(r"^jiffies: (\d+)$", text, re.M)
    if not m or uptime_s <= 330:
        return None
    est = (int(m.group(1)) - (1 << 32)) / (uptime_s - 300)
    best = min(KNOWN_HZ, key=lambda hz: abs(hz - est))
    return best if abs(best - est) < 0.05 * best else None


def kernel_hz() -> int:
    """The running kernel's HZ, to turn the tcp_sock's jiffies stamps into
    time: its config (/proc/config.gz, /boot/config-RELEASE), else
    /proc/timer_list, else 250 (the x86 and arm64 defaults' middle)."""
    import gzip  # noqa: PLC0415 - only at load

    for path in ("/proc/config.gz", f"/boot/config-{os.uname().release}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:  # type: ignore[operator]
                hz = hz_from_config(f.read())
            if hz:
                return hz
        except OSError:
            continue
    try:
        with open("/proc/timer_list") as f:
            head = f.read(1 << 16)
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return hz_from_timer_list(head, uptime) or 250
    except (OSError, ValueError, IndexError):
        return 250
