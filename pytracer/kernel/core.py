"""Pick a program for each hook, load the CO-RE object, attach, hand out maps.

Each hook has candidates in order of preference (see bpf/pytracer.bpf.c).
Cheap probes (BTF present? kprobe PMU? tracepoint in tracefs?) rule some
out first; the rest are tried for real: when the kernel refuses to load or
attach a candidate, that attach *kind* (fentry, kprobe, ...) is dropped for
every hook and the object is reopened, so at most a few loads happen.  Every
choice and every rejection is recorded with its reason; ``tracer doctor``
prints them.

``PYTRACER_ATTACH`` (or ``--attach``) forces one kind for every hook and
turns fallback off, so a test can prove each kind on its own.

A refusal costs a whole load (verifier runs included), and on a given boot
of a given kernel it is the same every time, so the kinds refused are
remembered in ``/run/pytracer/refused-kinds.json`` (tmpfs: gone at reboot),
keyed by boot id, kernel release and a hash of the BPF object; any change
of those, or a file that cannot be read or written, just means trying
again.  ``PYTRACER_REFUSED_CACHE`` moves the file ("" turns it off).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import struct
import sys
import zlib
from typing import Any, Iterable, Mapping

from pytracer.kernel import abi, libbpf
from pytracer.kernel.environment import (
    EnvironmentProblem,
    Features,
    ensure_mounts,
    kernel_hz,
    memlock_limit,
    probe_features,
    require_privileges,
)
from pytracer.kernel.hooks import (
    FORCED,
    HOOKS,
    OPT_IN_HOOKS,
    Choice,
    TracerError,
    candidates,
    check_attach_mode,
    not_needed,
    rejected_text,
    settle,
    static_veto,
    syscall_hooks_wanted,
    table_prealloc_reason,
)

DEFAULT_MAX_SOCKETS = 262144
# Capacity of the "owners" filter when it follows a process tree (tracer
# run): processes alive at once in the tree; exited ones leave it.  A
# plain --pid list keeps the object's 1024.
FOLLOW_MAX_PIDS = 65536


def _program_bytes() -> bytes:
    try:
        return libbpf.packaged_object("bpf/pytracer.bpf.o", "PYTRACER_BPF_OBJECT")
    except OSError:
        raise TracerError(
            "the BPF object pytracer/bpf/pytracer.bpf.o is missing: build it with `make` and reinstall"
        ) from None


REFUSED_CACHE = "/run/pytracer/refused-kinds.json"
# Refusals that say what the kernel allows (not a passing shortage): cacheable.
_DEFINITE_ERRNOS = {errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP, 524}  # 524: ENOTSUPP


def _boot_key(data: bytes) -> dict[str, str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return {"boot_id": boot, "release": os.uname().release, "object": f"{len(data)}-{zlib.crc32(data):08x}"}


def _cache_path() -> str:
    return os.environ.get("PYTRACER_REFUSED_CACHE", REFUSED_CACHE)


def load_refused(data: bytes) -> dict[str, str]:
    """Attach kinds refused earlier on this boot, kernel and object: kind ->
    reason.  Empty when unknown; never raises."""
    path = _cache_path()
    if not path:
        return {}
    try:
        with open(path) as f:
            cached = json.load(f)
        key = _boot_key(data)
        if not key["boot_id"] or any(cached.get(k) != v for k, v in key.items()):
            return {}
        refused = cached.get("refused", {})
        return {str(k): str(v) for k, v in refused.items() if k in {c.kind for cs in HOOKS.values() for c in cs}}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def save_refused(data: bytes, refused: dict[str, str]) -> None:
    """Remember refused kinds for the rest of this boot; best effort."""
    path = _cache_path()
    if not path:
        return
    tmp = f"{path}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({**_boot_key(data), "refused": refused}, f)
        os.replace(tmp, path)  # atomic: a concurrent reader sees old or new, never half
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


_FAILED_PROG = re.compile(r"prog '(\w+)': (?:BPF program load failed|failed to load)")


# The nursery in front of the socket table (CO-RE build, cookie keys; see
# "nursery" in bpf/pytracer.bpf.c): slots for the sockets born last, a
# power of two.  At 4,000 connections/s a socket keeps its slot ~2 s, which
# holds every short connection; 16,384 slots are 2.4 MiB of kernel memory.
NURSERY_SLOTS = 16384


def nursery_slots(max_sockets: int, key_by_ptr: bool) -> int:
    """The nursery's size for a table of ``max_sockets``: none when keys are
    pointers, or for a table so small (under four nurseries) that it is
    sized to be filled on purpose."""
    if key_by_ptr or max_sockets < 4 * NURSERY_SLOTS:
        return 0
    return NURSERY_SLOTS


class TracerHandle:
    """What both backends share: their configuration, context management,
    and widening the pid filter (through pytracer.table.writer, the one
    writer of the kernel's maps).  Subclasses provide open(), close() and
    map()."""

    backend = "core"
    key_by_ptr = False
    nursery_slots = 0  # see NURSERY_SLOTS
    # Why "socks" was preallocated (hooks.table_prealloc_reason), or None:
    # it allocates as it fills.
    table_prealloc: str | None = None
    # Writes this process made to "socks" (pytracer.table.writer): part of
    # socks_generation(), beside the kernel's own count.
    socks_writes = 0

    def __init__(
        self,
        max_sockets: int = DEFAULT_MAX_SOCKETS,
        pids: Iterable[int] = (),
        attach: str | None = None,
        syscall_hooks: bool | None = None,
        services: Mapping[Any, int] | None = None,
        services_auto: bool = False,
        follow_forks: bool = False,
    ) -> None:
        """``attach``: a mode of hooks.ATTACH_MODES (None: $PYTRACER_ATTACH or
        auto); ``syscall_hooks``: allow syscall tracepoints (None:
        $PYTRACER_SYSCALL_HOOKS; see pytracer.kernel.hooks); ``services``:
        the named services' slots (pytracer.inventory.services.assign),
        written into "svc_ports" at load; none: every end folds into other;
        ``services_auto``: full leak scans name the ports they find in the
        slots still free (--service-ports auto); ``follow_forks``: the pid
        filter follows the processes' descendants in the kernel (the opt-in
        "follow" hook; needs ``pids``)."""
        self.max_sockets = max_sockets
        self.services = dict(services or {})
        self.services_auto = services_auto
        self.pids = sorted(set(pids))
        self.follow_forks = follow_forks
        if follow_forks and not self.pids:
            raise TracerError("following forks needs a pid filter to start from")
        self.attach_mode = attach or os.environ.get("PYTRACER_ATTACH") or "auto"
        check_attach_mode(self.attach_mode, "core")  # a backend's own limits are checked at open()
        self.syscall_hooks = syscall_hooks_wanted(syscall_hooks, self.attach_mode)

    @property
    def capacity(self) -> int:
        """Records the kernel can hold: the table and its nursery."""
        return self.max_sockets + self.nursery_slots

    def open(self) -> TracerHandle:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def map(self, name: str) -> libbpf.Map:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_pids(self, pids: Iterable[int]) -> None:
        """Widen a --pid filter after load (e.g. a process started later)."""
        if not self.pids:
            raise TracerError("this tracer watches the whole host; there is no pid filter to widen")
        from pytracer.table import writer  # noqa: PLC0415 - the one writer of the tracer's maps

        writer.add_pids(self, pids)


class Tracer(TracerHandle):
    """The loaded and attached kernel side.  Use as a context manager."""

    def __init__(
        self,
        max_sockets: int = DEFAULT_MAX_SOCKETS,
        pids: Iterable[int] = (),
        attach: str | None = None,
        syscall_hooks: bool | None = None,
        services: Mapping[Any, int] | None = None,
        services_auto: bool = False,
        follow_forks: bool = False,
    ) -> None:
        super().__init__(max_sockets, pids, attach, syscall_hooks, services, services_auto, follow_forks)
        self.features: Features | None = None
        self.choices: dict[str, Choice] = {}
        self.key_by_ptr = False
        self.mounts: dict[str, str] = {}
        self.obj: libbpf.BpfObject | None = None
        self.links: list[libbpf.Link] = []
        self.ncpus = 1
        self.load_attempts = 0
        self._ban_reasons: dict[str, str] = {}

    # -- planning --------------------------------------------------------

    def _plan(self, banned: set[str]) -> dict[str, Choice]:
        f = self.features
        assert f is not None
        plan: dict[str, Choice] = {}
        forced = self.attach_mode in FORCED
        for hook in (*HOOKS, *(OPT_IN_HOOKS if self.follow_forks else ())):
            ch = Choice(hook)
            why_not = not_needed(hook, plan)
            if why_not:
                ch.reason = why_not
                plan[hook] = ch
                continue
            for c in candidates(hook, "core", self.attach_mode):
                veto = static_veto(c, f, self.syscall_hooks)
                if veto is None and c.kind in banned:
                    veto = banned_reason(self._ban_reasons, c.kind)
                if veto:
                    ch.rejected.append((c.kind, veto))
                    continue
                ch.kind, ch.programs = c.kind, c.programs
                first = not ch.rejected
                ch.reason = "preferred" if first else "fallback: " + rejected_text(ch)
                if forced:
                    ch.reason = f"forced by attach mode {self.attach_mode}"
                break
            settle(ch, self.syscall_hooks)
            plan[hook] = ch
        return plan

    # -- lifecycle -------------------------------------------------------

    def open(self) -> Tracer:
        require_privileges()
        self.mounts = ensure_mounts()
        self.features = probe_features()
        if not self.features.btf:
            raise EnvironmentProblem(
                "this kernel has no BTF (/sys/kernel/btf/vmlinux), which the CO-RE backend needs: "
                "use a kernel built with CONFIG_DEBUG_INFO_BTF=y, or --backend bcc with kernel headers"
            )
        try:
            libbpf.library()
        except libbpf.LibbpfMissing as exc:
            raise EnvironmentProblem(str(exc)) from None
        self.ncpus = libbpf.num_possible_cpus()
        data = _program_bytes()
        cached = load_refused(data) if self.attach_mode == "auto" else {}
        self._ban_reasons = {k: f"{why}; remembered for this boot ({_cache_path()})" for k, why in cached.items()}
        banned: set[str] = set(cached)
        refused_now: dict[str, str] = {}
        # Bounded: each failed round bans one more attach kind (there are 5).
        for _ in range(6):
            self.load_attempts += 1
            try:
                plan = self._plan(banned)
            except TracerError:
                if not cached:
                    raise
                # What was remembered leaves no way to hook: forget it, try for real.
                banned -= set(cached)
                for k in cached:
                    self._ban_reasons.pop(k, None)
                cached = {}
                plan = self._plan(banned)
            try:
                self._load_and_attach(data, plan)
                self.choices = plan
                if refused_now:
                    save_refused(data, {**cached, **refused_now})
                return self
            except libbpf.LibbpfError as exc:
                self.close()
                kind = self._culprit_kind(exc, plan)
                if kind is None or self.attach_mode != "auto":
                    raise TracerError(self._explain(exc, plan)) from None
                banned.add(kind)
                self._ban_reasons[kind] = f"kernel refused it ({os.strerror(exc.errno)})"
                if exc.errno in _DEFINITE_ERRNOS:
                    refused_now[kind] = self._ban_reasons[kind]
        raise TracerError("could not find a working set of BPF programs for this kernel")

    def _culprit_kind(self, exc: libbpf.LibbpfError, plan: dict[str, Choice]) -> str | None:
        names: set[str] = set(_FAILED_PROG.findall(exc.log))
        m = re.match(r"attach (\w+)", exc.what)
        if m:
            names.add(m.group(1))
        for ch in plan.values():
            if names & set(ch.programs):
                return ch.kind
        return None

    def _explain(self, exc: libbpf.LibbpfError, plan: dict[str, Choice]) -> str:
        what = exc.what
        names = set(_FAILED_PROG.findall(exc.log))
        if names:
            what = "loading " + ", ".join(sorted(names))
        hint = ""
        old_kernel = self.features is not None and self.features.version < (5, 11)
        if exc.errno in (1, 13) and old_kernel and memlock_limit() != "unlimited":
            # libbpf raises the limit itself where it may (CAP_SYS_RESOURCE); here it could not.
            hint = (f" (RLIMIT_MEMLOCK is {memlock_limit()} and kernels before 5.11 charge BPF memory to it: "
                    "run `ulimit -l unlimited` first, or grant CAP_SYS_RESOURCE)")
        return f"{what} failed: {os.strerror(exc.errno)}{hint}"

    def _load_and_attach(self, data: bytes, plan: dict[str, Choice]) -> None:
        f = self.features
        assert f is not None
        obj = libbpf.BpfObject(data, "pytracer")
        self.obj = obj
        wanted = {p for ch in plan.values() for p in ch.programs}
        for prog in obj.programs():
            prog.autoload = prog.name in wanted
        # Keying: a cookie needs a BTF-pointer program on v5.12+; else the pointer.
        self.key_by_ptr = plan["state"].kind not in ("tp_btf", "fentry") or not f.cookie_in_tracing
        self.nursery_slots = nursery_slots(self.max_sockets, self.key_by_ptr)
        cfg = abi.PtConfig(filter_owner=1 if self.pids else 0, key_by_ptr=1 if self.key_by_ptr else 0,
                           hz=kernel_hz(), nursery_bits=max(0, self.nursery_slots.bit_length() - 1))
        rodata = obj.map(".rodata")
        if rodata.initial_value_size() != ctypes.sizeof(cfg):
            raise TracerError("BPF object and pytracer/abi.py disagree on the config layout: rebuild with `make`")
        rodata.set_initial_value(bytes(cfg))
        socks = obj.map("socks")
        socks.max_entries = self.max_sockets
        self.table_prealloc = table_prealloc_reason(((h, ch.kind) for h, ch in plan.items()), f.version)
        if self.table_prealloc:
            socks.flags &= ~libbpf.BPF_F_NO_PREALLOC
        obj.map("nursery").max_entries = max(1, self.nursery_slots)
        if self.follow_forks:
            obj.map("owners").max_entries = FOLLOW_MAX_PIDS
        obj.load()
        from pytracer.table import writer  # noqa: PLC0415 - the one writer of the tracer's maps

        writer.fill_pid_filter(obj.map("owners"), self.pids)
        if self.services:
            writer.fill_services(obj.map("svc_ports"), self.services)
        for ch in plan.values():
            for name in ch.programs:
                self.links.append(obj.program(name).attach())

    def close(self) -> None:
        for link in reversed(self.links):
            link.destroy()
        self.links = []
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    # -- access ----------------------------------------------------------

    def map(self, name: str) -> libbpf.Map:
        if self.obj is None:
            raise TracerError("tracer is not loaded")
        return self.obj.map(name)

    def socks_generation(self) -> int | None:
        """How many times "socks" has changed: the kernel's writes to it
        ("socks_gen" in bpf/pytracer.bpf.c) and this process's own.  None
        without a nursery, where the kernel does not count them."""
        if not self.nursery_slots:
            return None
        raw = self.map("socks_gen").lookup(struct.pack("=I", 0), 8)
        return None if raw is None else int.from_bytes(raw, sys.byteorder) + self.socks_writes

    def programs(self) -> list[libbpf.Program]:
        if self.obj is None:
            return []
        return [p for p in self.obj.programs() if p.autoload]

    def kprobe_misses(self) -> dict[str, int] | None:
        """Per kprobe program, the hits the kprobes core skipped
        (libbpf.Link.kprobe_missed); {} with no kprobe attached, None when
        this kernel does not say (before v6.7)."""
        kprobes = {p for ch in self.choices.values() if ch.kind == "kprobe" for p in ch.programs}
        out: dict[str, int] = {}
        for link in self.links:
            if link.program in kprobes:
                missed = link.kprobe_missed()
                if missed is None:
                    return None
                out[link.program] = out.get(link.program, 0) + missed
        return out


def banned_reason(reasons: dict[str, str], kind: str) -> str:
    return reasons.get(kind, "kernel refused it")
