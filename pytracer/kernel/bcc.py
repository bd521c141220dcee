"""The bcc backend: compile bpf/pytracer_bcc.c at start-up for hosts without BTF.

(About 500 lines: one backend, from finding headers to compiling, attaching
by the shared hook table and handing out maps by fd.)

The CO-RE object needs kernel BTF.  Where there is none but the kernel's
headers are installed, bcc (Debian's python3-bpfcc) compiles the same
lifecycle against those headers.  :class:`BccTracer` has the surface the
rest of pytracer uses from :class:`pytracer.kernel.core.Tracer` (``map()``,
``ncpus``, ``choices``, ``programs()``, ...), and the maps it hands out have
the names, types and value layouts of the CO-RE object's (bpf/pytracer.h),
so the poller, model, views and exporter run unchanged.

bcc is used only to compile, load and attach.  Maps are read through their
fds with the same libbpf calls as the CO-RE backend (:class:`FdMap`), so a
dump is one BPF_MAP_LOOKUP_BATCH walk whichever backend filled the map.

Hooks get the same kinds of programs as the CO-RE loader's tracepoint and
kprobe fallbacks: a tracepoint, else a kprobe, for state changes; kretprobe,
else the accept syscall tracepoints, for accept; kprobe, else close(2), for
the application's close.  A record ends at its transition to CLOSE.
Records are keyed by sk pointer (no socket cookie outside BTF programs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from pytracer.kernel import libbpf
from pytracer.kernel.core import DEFAULT_MAX_SOCKETS, FOLLOW_MAX_PIDS, TracerHandle
from pytracer.kernel.environment import (
    TRACEFS,
    EnvironmentProblem,
    Features,
    ensure_mounts,
    probe_features,
    require_privileges,
)
from pytracer.kernel.hooks import (
    HOOK_TARGETS,
    HOOKS,
    OPT_IN_HOOKS,
    Candidate,
    Choice,
    Probe,
    TracerError,
    candidates,
    check_attach_mode,
    not_needed,
    optional,
    rejected_text,
    settle,
    static_veto,
    table_prealloc_reason,
)

SOURCE_NAME = "pytracer_bcc.c"


# -D define that compiles each tracepoint program in (bcc builds a
# tracepoint's context struct from tracefs, so absent ones must stay out).
TP_DEFINES = {
    "sock:inet_sock_set_state": "PT_TP_STATE",
    "syscalls:sys_exit_accept4": "PT_TP_ACCEPT4",
    "syscalls:sys_exit_accept": "PT_TP_ACCEPT",
    "syscalls:sys_enter_close": "PT_TP_CLOSE",
    "tcp:tcp_receive_reset": "PT_TP_RESET",
}


# --- maps and programs by fd --------------------------------------------------


class BpfMapInfo(ctypes.Structure):
    """The leading part of struct bpf_map_info (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def _obj_info(fd: int, info: ctypes.Structure, what: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = libbpf.library().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if rc < 0:
        err = -rc if rc != -1 else (ctypes.get_errno() or errno_mod.EINVAL)
        raise libbpf.LibbpfError(err, what)


class FdMap(libbpf.Map):
    """A map known only by its fd (here: one bcc created).

    Reuses :class:`pytracer.kernel.libbpf.Map`'s lookup/update/delete/dump, which
    need nothing but the fd and the sizes; those come from the kernel
    (BPF_OBJ_GET_INFO_BY_FD), not from bcc's idea of the types.
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name
        info = BpfMapInfo()
        _obj_info(fd, info, f"map info {name}")
        self.map_type = int(info.type)
        self._key_size = int(info.key_size)
        self._value_size = int(info.value_size)
        self._max_entries = int(info.max_entries)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def key_size(self) -> int:
        return self._key_size

    @property
    def value_size(self) -> int:
        return self._value_size

    def set_initial_value(self, data: bytes) -> None:
        raise TracerError(f"map {self.name} is already loaded (bcc backend)")

    def initial_value_size(self) -> int:
        return 0


class FdProgram:
    """A loaded program known by its fd: name and run statistics."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd

    def info(self) -> libbpf.ProgInfo:
        info = libbpf.ProgInfo()
        _obj_info(self.fd, info, f"prog info {self.name}")
        return info


# --- the environment bcc needs -------------------------------------------------


def import_bcc() -> Any:
    """bcc's Python module, or :class:`EnvironmentProblem`.

    Debian installs it for the system Python only (python3-bpfcc, in
    /usr/lib/python3/dist-packages); a virtualenv without system site
    packages cannot see it, so that directory is tried as well.
    """
    try:
        import bcc  # noqa: PLC0415 - optional dependency
    except ImportError:
        dist = "/usr/lib/python3/dist-packages"
        if os.path.isdir(os.path.join(dist, "bcc")) and dist not in sys.path:
            sys.path.append(dist)
            try:
                import bcc  # noqa: PLC0415
            except ImportError as exc:
                raise EnvironmentProblem(f"bcc's Python module is installed but does not import: {exc}") from None
        else:
            raise EnvironmentProblem(
                "the bcc backend needs bcc's Python module, which is not installed: apt install python3-bpfcc"
            ) from None
    return bcc


def find_headers(release: str) -> str:
    """Where bcc will find this kernel's headers, or :class:`EnvironmentProblem`.

    bcc looks in $BCC_KERNEL_SOURCE, /lib/modules/RELEASE/{build,source},
    and the kernel's own archive (CONFIG_IKHEADERS: /sys/kernel/kheaders.tar.xz,
    or the kheaders module it loads).
    """
    env_src = os.environ.get("BCC_KERNEL_SOURCE")
    for base in ([env_src] if env_src else []) + [f"/lib/modules/{release}/build", f"/lib/modules/{release}/source"]:
        if os.path.isdir(os.path.join(base, "include")):
            return os.path.realpath(base)
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    try:
        with open(f"/lib/modules/{release}/modules.dep") as f:
            if any("/kheaders.ko" in line.split(":", 1)[0] for line in f):
                return "kheaders module"
    except OSError:
        pass
    raise EnvironmentProblem(
        f"kernel headers for {release} not found (the bcc backend compiles against them): "
        f"apt install linux-headers-{release}"
    )


def ensure_debug_tracing() -> None:
    """Older bcc (e.g. Debian 11's 0.18) reads tracepoint formats only under
    /sys/kernel/debug/tracing: mount debugfs when that is missing."""
    if os.path.isdir("/sys/kernel/debug/tracing/events"):
        return
    if not os.path.isdir("/sys/kernel/debug"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    libc.mount(b"debugfs", b"/sys/kernel/debug", b"debugfs", 0, None)  # best effort


def source_path() -> Path:
    """bpf/pytracer_bcc.c: $PYTRACER_BCC_SOURCE, the package, or the source tree."""
    override = os.environ.get("PYTRACER_BCC_SOURCE")
    candidates = [Path(override)] if override else []
    package = Path(__file__).resolve().parents[1]
    candidates += [package / "bpf" / SOURCE_NAME, package.parent / "bpf" / SOURCE_NAME]
    for c in candidates:
        if c.is_file() and (c.parent / "pytracer.h").is_file():
            return c
    raise TracerError(
        f"the bcc program {SOURCE_NAME} (with pytracer.h beside it) is missing; looked in "
        + ", ".join(str(c) for c in candidates)
        + " (or set PYTRACER_BCC_SOURCE)"
    )


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what C++ code (clang's diagnostics) writes to fd 2."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.extend(tmp.read().decode(errors="replace").splitlines())


def first_error(lines: list[str]) -> str:
    """The first clang error in bcc's output, shortened to one line."""
    for line in lines:
        m = re.search(r"error: (.*)", line)
        if m:
            loc = re.match(r"(\S+?:\d+:\d+):", line)
            return (f"{os.path.basename(loc.group(1))}: " if loc else "") + m.group(1).strip()
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "no diagnostics")


def _tp_exists(target: str) -> bool:
    cat, event = target.split(":")
    return os.path.isdir(os.path.join(TRACEFS, "events", cat, event))


def _tp_has_field(target: str, field: str) -> bool:
    cat, event = target.split(":")
    try:
        with open(os.path.join(TRACEFS, "events", cat, event, "format")) as fh:
            return re.search(rf"\b{field};", fh.read()) is not None
    except OSError:
        return False


# --- the tracer ------------------------------------------------------------------


class BccTracer(TracerHandle):
    """The bcc-compiled kernel side, loaded and attached.  A context manager.

    ``reason`` says why this backend was picked (for messages and doctor).
    """

    backend = "bcc"
    key_by_ptr = True

    def __init__(
        self,
        max_sockets: int = DEFAULT_MAX_SOCKETS,
        pids: Iterable[int] = (),
        attach: str | None = None,
        reason: str | None = None,
        syscall_hooks: bool | None = None,
        services: Mapping[Any, int] | None = None,
        services_auto: bool = False,
        follow_forks: bool = False,
    ) -> None:
        super().__init__(max_sockets, pids, attach, syscall_hooks, services, services_auto, follow_forks)
        self.reason = reason or "--backend bcc"
        self.features: Features | None = None
        self.choices: dict[str, Choice] = {}
        self.mounts: dict[str, str] = {}
        self.ncpus = 1
        self.load_attempts = 0
        self.headers: str | None = None
        self.bcc_version: str | None = None
        self.compile_seconds: float | None = None
        self.source: Path | None = None
        self._bpf: Any = None
        self._maps: dict[str, FdMap] = {}
        self._attached: list[Probe] = []

    # -- lifecycle -------------------------------------------------------

    def _problem(self, exc: EnvironmentProblem) -> EnvironmentProblem:
        if self.reason.startswith("auto: "):
            return EnvironmentProblem(f"{self.reason[len('auto: '):]}, and {exc}")
        return exc

    def open(self) -> BccTracer:
        check_attach_mode(self.attach_mode, "bcc")
        require_privileges()
        self.mounts = ensure_mounts()
        ensure_debug_tracing()
        self.features = f = probe_features()
        try:
            bcc = import_bcc()
            libbpf.library()
            self.headers = find_headers(f.release)
        except libbpf.LibbpfMissing as exc:
            raise self._problem(EnvironmentProblem(str(exc))) from None
        except EnvironmentProblem as exc:
            raise self._problem(exc) from None
        self.bcc_version = str(getattr(bcc, "__version__", "unknown"))
        self.ncpus = libbpf.num_possible_cpus()
        self.source = source_path()

        plan = self._plan(f)
        self._compile(bcc, f)
        self._attach(plan)
        from pytracer.table import writer  # noqa: PLC0415 - the one writer of the tracer's maps

        writer.fill_pid_filter(self.map("owners"), self.pids)
        if self.services:
            writer.fill_services(self.map("svc_ports"), self.services)
        return self

    def _plan(self, f: Features) -> dict[str, list[Candidate]]:
        """Per hook, the candidates left after the cheap probes, best first."""
        plan: dict[str, list[Candidate]] = {}
        for hook in (*HOOKS, *(OPT_IN_HOOKS if self.follow_forks else ())):
            ch = Choice(hook)
            left = []
            for c in candidates(hook, "bcc", self.attach_mode):
                veto = static_veto(c, f, self.syscall_hooks)
                if veto is None and hook == "reset" and not _tp_has_field(c.probes[0].target, "skaddr"):
                    veto = "tracepoint tcp/tcp_receive_reset has no skaddr field on this kernel"
                if veto:
                    ch.rejected.append((c.kind, veto))
                else:
                    left.append(c)
            # "listen" is needed only if the state hook ends up a kprobe (see _attach).
            if not left and not optional(hook, self.syscall_hooks) and hook != "listen":
                why = rejected_text(ch) or "no candidate for this attach mode"
                raise TracerError(f"cannot hook {HOOK_TARGETS[hook]} ({why})")
            self.choices[hook] = ch
            plan[hook] = left
        # Every bcc program is a kprobe or a classic tracepoint.
        self.table_prealloc = table_prealloc_reason(((h, c.kind) for h, cs in plan.items() for c in cs), f.version)
        return plan

    def _cflags(self, f: Features) -> list[str]:
        assert self.source is not None
        flags = [
            f"-I{self.source.parent}",
            f"-DPT_MAX_SOCKETS={int(self.max_sockets)}",
            f"-DPT_FILTER_OWNER={1 if self.pids else 0}",
            # "socks" preallocated (0) or allocated as it fills (BPF_F_NO_PREALLOC, the default).
            *(["-DPT_SOCKS_FLAGS=0"] if self.table_prealloc else []),
            # The process-tree twins (tracer run) and the filter's size for them.
            *(["-DPT_FOLLOW=1", f"-DPT_MAX_OWNERS={FOLLOW_MAX_PIDS}"] if self.follow_forks else []),
            # Kernel headers warn a lot under bcc's clang; keep stderr readable.
            "-Wno-unused-function",
        ]
        for target, define in TP_DEFINES.items():
            if f.tracefs and _tp_exists(target):
                if target == "tcp:tcp_receive_reset" and not _tp_has_field(target, "skaddr"):
                    continue
                flags.append(f"-D{define}=1")
        return flags

    def _compile(self, bcc: Any, f: Features) -> None:
        import time

        assert self.source is not None
        self.load_attempts += 1
        t0 = time.monotonic()
        try:
            with _stderr_captured() as diag:
                self._bpf = bcc.BPF(src_file=str(self.source).encode(), cflags=self._cflags(f))
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
            detail = first_error(diag) if diag else str(exc)
            raise TracerError(
                f"bcc could not compile {self.source.name} against the headers of {f.release} "
                f"({self.headers}): {detail}"
            ) from None
        self.compile_seconds = time.monotonic() - t0

    def _attach_probe(self, p: Probe) -> None:
        b = self._bpf
        if p.how == "kprobe":
            b.attach_kprobe(event=p.target.encode(), fn_name=p.program.encode())
        elif p.how == "kretprobe":
            b.attach_kretprobe(event=p.target.encode(), fn_name=p.program.encode())
        else:
            b.attach_tracepoint(tp=p.target.encode(), fn_name=p.program.encode())
        self._attached.append(p)

    def _detach_probe(self, p: Probe) -> None:
        b = self._bpf
        with contextlib.suppress(Exception):
            if p.how == "kprobe":
                b.detach_kprobe(event=p.target.encode(), fn_name=p.program.encode())
            elif p.how == "kretprobe":
                b.detach_kretprobe(event=p.target.encode(), fn_name=p.program.encode())
            else:
                b.detach_tracepoint(tp=p.target.encode())
        if p in self._attached:
            self._attached.remove(p)

    def _attach(self, plan: dict[str, list[Candidate]]) -> None:
        assert self.features is not None
        for hook, cands in plan.items():
            ch = self.choices[hook]
            why_not = not_needed(hook, self.choices)
            if why_not:
                ch.reason = why_not
                continue
            for c in cands:
                done: list[Probe] = []
                diag: list[str] = []
                try:
                    for p in c.probes:
                        if p.how == "tracepoint" and not _tp_exists(p.target):
                            continue  # an optional twin (sys_exit_accept)
                        with _stderr_captured() as diag:
                            self._attach_probe(p)
                        done.append(p)
                except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
                    for p in done:
                        self._detach_probe(p)
                    why = str(exc).splitlines()[0] if str(exc) else "refused"
                    hint = first_error(diag) if diag and "error" in " ".join(diag) else ""
                    why = f"kernel refused it ({why}{'; ' + hint if hint else ''})"
                    if self.attach_mode != "auto" and not optional(hook, self.syscall_hooks):
                        raise TracerError(f"attaching {', '.join(c.programs)} failed: {why}") from None
                    ch.rejected.append((c.kind, why))
                    continue
                ch.kind = c.kind
                ch.programs = tuple(p.program for p in done)
                if self.attach_mode != "auto":
                    ch.reason = f"forced by attach mode {self.attach_mode}"
                elif ch.rejected:
                    ch.reason = "fallback: " + rejected_text(ch)
                else:
                    ch.reason = "preferred (bcc backend)"
                break
            settle(ch, self.syscall_hooks)

    def close(self) -> None:
        self._maps = {}
        if self._bpf is not None:
            for p in reversed(list(self._attached)):
                self._detach_probe(p)
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None
        self._attached = []

    # -- access ----------------------------------------------------------

    def map(self, name: str) -> FdMap:
        if self._bpf is None:
            raise TracerError("tracer is not loaded")
        m = self._maps.get(name)
        if m is None:
            try:
                table = self._bpf.get_table(name.encode())
            except Exception:  # noqa: BLE001 - bcc raises KeyError or Exception
                raise libbpf.LibbpfError(errno_mod.ENOENT, f"no map {name!r} in the bcc program") from None
            m = self._maps[name] = FdMap(int(table.map_fd), name)
        return m

    def programs(self) -> list[FdProgram]:
        if self._bpf is None:
            return []
        out = []
        for p in self._attached:
            fn = self._bpf.funcs.get(p.program.encode()) or self._bpf.funcs.get(p.program)
            if fn is not None and all(q.name != p.program for q in out):
                out.append(FdProgram(p.program, int(fn.fd)))
        return out
