"""A thin ctypes binding to the system libbpf (libbpf.so.1).

(One module of ~700 lines on purpose: it is one C library's binding, each
function declared once in one table, with the handles that own what those
functions return.  Nothing else in pytracer calls ctypes on libbpf.)

Only what pytracer needs is declared, each function once, through
:func:`_fn`, which sets argtypes/restype and an errcheck that turns libbpf's
error contract into :class:`LibbpfError`:

* a function returning a pointer signals failure with NULL and sets errno;
* a function returning int signals failure with a negative ``-errno``.

Handles (:class:`BpfObject`, :class:`Link`) are context managers; nothing
stays attached once they are closed.  An iterator link
(:meth:`Program.attach_iter`) runs its program only while
:meth:`Link.read_iter` reads it.  ``PYTRACER_LIBBPF`` overrides the library
path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import mmap
import os
import threading
from collections import deque
from typing import Any, Callable, Iterator

__all__ = [
    "LibbpfError",
    "LibbpfMissing",
    "BpfObject",
    "Program",
    "Map",
    "Link",
    "num_possible_cpus",
    "ProgInfo",
]


class LibbpfError(OSError):
    """A libbpf call failed; ``errno`` holds the kernel's reason."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what
        self.log = log


class LibbpfMissing(RuntimeError):
    """libbpf.so.1 could not be loaded."""


# --- loading the library ---------------------------------------------------

_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    override = os.environ.get("PYTRACER_LIBBPF")
    # find_library runs `ldconfig -p` (a fork and exec): only when the soname fails.
    candidates = [override] if override else ["libbpf.so.1", lambda: ctypes.util.find_library("bpf")]
    errors = []
    for name in candidates:
        if callable(name):
            name = name()
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            errors.append(str(exc))
            continue
        if not hasattr(lib, "bpf_object__open_mem") or not hasattr(lib, "bpf_program__set_autoload"):
            errors.append(f"{name} is older than libbpf 1.0")
            continue
        try:
            _declare(lib)
        except AttributeError as exc:  # a 0.x libbpf: some function we call is missing
            missing = str(exc).rsplit(": ", 1)[-1]
            errors.append(f"{name} is older than libbpf 1.0 ({missing})")
            continue
        _lib = lib
        return lib
    found = any("older than" in e for e in errors)
    raise LibbpfMissing(
        ("no usable libbpf" if found else "libbpf.so.1 not found") + " (" + "; ".join(errors or ["no candidates"])
        + "): install libbpf 1.0 or newer (apt install libbpf1) or set PYTRACER_LIBBPF=/path/to/libbpf.so.1"
    )


c_void_p = ctypes.c_void_p
c_int = ctypes.c_int
c_uint = ctypes.c_uint
c_char_p = ctypes.c_char_p
c_size_t = ctypes.c_size_t
c_uint32 = ctypes.c_uint32
c_uint64 = ctypes.c_uint64
c_bool = ctypes.c_bool


def _check_ptr(result: Any, func: Any, args: tuple) -> Any:
    if not result:
        err = ctypes.get_errno() or errno_mod.EINVAL
        raise LibbpfError(err, func.__name__, _log_tail())
    return result


def _check_int(result: int, func: Any, args: tuple) -> int:
    if result < 0:
        raise LibbpfError(-result, func.__name__, _log_tail())
    return result


def _fn(lib: ctypes.CDLL, name: str, restype: Any, argtypes: list, check: Callable | None) -> None:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = argtypes
    if check is not None:
        f.errcheck = check


class BpfMapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class BpfObjectOpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts (libbpf 1.0): only the leading fields we set;
    # `sz` tells libbpf how much of the struct we know.
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_pad", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
    ]


class ProgInfo(ctypes.Structure):
    """The leading part of struct bpf_prog_info (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", c_uint32),
        ("gpl_compatible_etc", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32),
        ("attach_btf_id", c_uint32),
        ("_pad", c_uint32),
    ]


class PerfLinkInfo(ctypes.Structure):
    """struct bpf_link_info (include/uapi/linux/bpf.h) as the kernel fills
    it for a perf_event link to a kprobe or kretprobe (v6.6; ``missed``
    v6.7): the head, then perf_event.kprobe.  Asked with no name buffer."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("prog_id", c_uint32),
        ("_pad0", c_uint32),
        ("perf_event_type", c_uint32),
        ("_pad1", c_uint32),
        ("func_name", c_uint64),
        ("name_len", c_uint32),
        ("offset", c_uint32),
        ("addr", c_uint64),
        ("missed", c_uint64),
        ("cookie", c_uint64),
    ]


BPF_LINK_TYPE_PERF_EVENT = 7  # enum bpf_link_type
BPF_PERF_EVENT_KPROBES = (3, 4)  # enum bpf_perf_event_type: KPROBE, KRETPROBE


_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_log_lines: deque[str] = deque(maxlen=200)
_log_lock = threading.Lock()


LIBBPF_DEBUG = 2  # enum libbpf_print_level: WARN 0, INFO 1, DEBUG 2
BPF_F_NO_PREALLOC = 1  # include/uapi/linux/bpf.h
# libbpf prints ~1,000 debug lines per object load (CO-RE relocations, map
# and program setup); crossing into Python for each costs ~15 ms of start-up
# and would push the warnings that explain a failure out of the kept tail.
# PYTRACER_LIBBPF_DEBUG=1 keeps them.
_keep_debug = os.environ.get("PYTRACER_LIBBPF_DEBUG", "") not in ("", "0")
_print_buf = ctypes.create_string_buffer(1 << 16)


def packaged_object(relpath: str, override_env: str) -> bytes:
    """The bytes of a BPF object shipped in the pytracer package
    (``relpath`` below it, e.g. "bpf/pytracer.bpf.o"), or of the file the
    environment variable ``override_env`` names.  Raises OSError.

    A plain file in the package is read directly (importlib.resources
    would import its zip readers first: ~13 ms of start-up); resources for
    any other installation.
    """
    override = os.environ.get(override_env)
    if override:
        with open(override, "rb") as fh:
            return fh.read()
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.join(package, *relpath.split("/"))
    if os.path.isfile(here):
        with open(here, "rb") as fh:
            return fh.read()
    from importlib import resources

    return resources.files("pytracer").joinpath(relpath).read_bytes()


def _on_print(level: int, fmt: bytes, va_list: int) -> int:
    if level >= LIBBPF_DEBUG and not _keep_debug:
        return 0
    # va_list is passed by pointer on x86-64 and arm64; vsnprintf formats it.
    with _log_lock:
        _libc.vsnprintf(_print_buf, len(_print_buf), fmt, c_void_p(va_list))
        for line in _print_buf.value.decode(errors="replace").splitlines():
            _log_lines.append(line)
    return 0


_print_cb = _PRINT_FN(_on_print)


def _log_tail(n: int = 40) -> str:
    with _log_lock:
        return "\n".join(list(_log_lines)[-n:])


def clear_log() -> None:
    with _log_lock:
        _log_lines.clear()


def _declare(lib: ctypes.CDLL) -> None:
    P, N = _check_ptr, _check_int  # NULL means errno; negative int is -errno
    _libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
    _fn(lib, "libbpf_set_print", c_void_p, [_PRINT_FN], None)
    _fn(lib, "bpf_object__open_mem", c_void_p, [c_void_p, c_size_t, ctypes.POINTER(BpfObjectOpenOpts)], P)
    _fn(lib, "bpf_object__load", c_int, [c_void_p], N)
    _fn(lib, "bpf_object__close", None, [c_void_p], None)
    _fn(lib, "bpf_object__find_program_by_name", c_void_p, [c_void_p, c_char_p], P)
    _fn(lib, "bpf_object__find_map_by_name", c_void_p, [c_void_p, c_char_p], P)
    _fn(lib, "bpf_object__next_program", c_void_p, [c_void_p, c_void_p], None)
    _fn(lib, "bpf_program__name", c_char_p, [c_void_p], None)
    _fn(lib, "bpf_program__section_name", c_char_p, [c_void_p], None)
    _fn(lib, "bpf_program__set_autoload", c_int, [c_void_p, c_bool], N)
    _fn(lib, "bpf_program__autoload", c_bool, [c_void_p], None)
    _fn(lib, "bpf_program__fd", c_int, [c_void_p], N)
    _fn(lib, "bpf_program__attach", c_void_p, [c_void_p], P)
    _fn(lib, "bpf_link__destroy", c_int, [c_void_p], None)
    _fn(lib, "bpf_program__attach_iter", c_void_p, [c_void_p, c_void_p], P)
    _fn(lib, "bpf_link__fd", c_int, [c_void_p], N)
    _fn(lib, "bpf_iter_create", c_int, [c_int], N)
    _fn(lib, "bpf_map__fd", c_int, [c_void_p], N)
    _fn(lib, "bpf_map__set_max_entries", c_int, [c_void_p, c_uint32], N)
    _fn(lib, "bpf_map__max_entries", c_uint32, [c_void_p], None)
    _fn(lib, "bpf_map__set_map_flags", c_int, [c_void_p, c_uint32], N)
    _fn(lib, "bpf_map__map_flags", c_uint32, [c_void_p], None)
    _fn(lib, "bpf_map__value_size", c_uint32, [c_void_p], None)
    _fn(lib, "bpf_map__key_size", c_uint32, [c_void_p], None)
    _fn(lib, "bpf_map__set_initial_value", c_int, [c_void_p, c_void_p, c_size_t], N)
    _fn(lib, "bpf_map__initial_value", c_void_p, [c_void_p, ctypes.POINTER(c_size_t)], None)
    _fn(lib, "bpf_map_lookup_elem", c_int, [c_int, c_void_p, c_void_p], None)
    _fn(lib, "bpf_map_update_elem", c_int, [c_int, c_void_p, c_void_p, c_uint64], None)
    _fn(lib, "bpf_map_delete_elem", c_int, [c_int, c_void_p], None)
    _fn(lib, "bpf_map_lookup_batch", c_int,
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, ctypes.POINTER(c_uint32), ctypes.POINTER(BpfMapBatchOpts)],
        None)
    _fn(lib, "bpf_map_update_batch", c_int,
        [c_int, c_void_p, c_void_p, ctypes.POINTER(c_uint32), ctypes.POINTER(BpfMapBatchOpts)], None)
    _fn(lib, "bpf_map_get_next_key", c_int, [c_int, c_void_p, c_void_p], None)
    _fn(lib, "bpf_obj_get_info_by_fd", c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)], None)
    _fn(lib, "bpf_map_get_next_id", c_int, [c_uint32, ctypes.POINTER(c_uint32)], None)
    _fn(lib, "bpf_map_get_fd_by_id", c_int, [c_uint32], None)
    _fn(lib, "libbpf_num_possible_cpus", c_int, [], N)
    _fn(lib, "libbpf_probe_bpf_prog_type", c_int, [c_int, c_void_p], None)
    lib.libbpf_set_print(_print_cb)


def library() -> ctypes.CDLL:
    """The loaded libbpf, declared.  Raises :class:`LibbpfMissing`."""
    return _load()


def num_possible_cpus() -> int:
    return library().libbpf_num_possible_cpus()


def _errno_of(rc: int) -> int:
    # libbpf 1.x returns -errno; be robust to the legacy -1 + errno form.
    if rc == -1:
        return ctypes.get_errno() or errno_mod.EINVAL
    return -rc


# --- handles -----------------------------------------------------------------


class IterLinkInfo(ctypes.Structure):
    """union bpf_iter_link_info (include/uapi/linux/bpf.h), its task member,
    padded to the union's 16 bytes (the cgroup member is the largest)."""

    _fields_ = [("tid", c_uint32), ("pid", c_uint32), ("pid_fd", c_uint32), ("_pad", c_uint32)]


class IterAttachOpts(ctypes.Structure):
    """struct bpf_iter_attach_opts (libbpf.h)."""

    _fields_ = [("sz", c_size_t), ("link_info", c_void_p), ("link_info_len", c_uint32)]


class Link:
    """An attached program; destroying the link detaches it."""

    def __init__(self, ptr: int, program: str) -> None:
        self._ptr: int | None = ptr
        self.program = program

    def destroy(self) -> None:
        if self._ptr:
            library().bpf_link__destroy(self._ptr)
            self._ptr = None

    @property
    def fd(self) -> int:
        if not self._ptr:
            raise LibbpfError(errno_mod.EBADF, f"link of {self.program} is destroyed")
        return library().bpf_link__fd(self._ptr)

    def kprobe_missed(self) -> int | None:
        """Times the kprobes core skipped this link's kprobe (it fired while
        another kprobe's handler ran on that CPU, or a kretprobe had no free
        instance): such a hit never reaches the program, so it is not in its
        recursion_misses.  None when this is no kprobe link, or the kernel
        does not say (before v6.7; before v5.15 a kprobe is attached without
        a BPF link)."""
        info = PerfLinkInfo()
        size = c_uint32(ctypes.sizeof(info))
        try:
            rc = library().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size))
        except LibbpfError:
            return None
        if rc < 0 or info.type != BPF_LINK_TYPE_PERF_EVENT or info.perf_event_type not in BPF_PERF_EVENT_KPROBES:
            return None
        return int(info.missed)

    def read_iter(self, reserve: int = 64 << 20) -> tuple[mmap.mmap, int]:
        """Run an iterator link once: everything its program writes.

        Each call creates a new iterator fd (BPF_ITER_CREATE), reads it to
        EOF and closes it.  The output goes into an anonymous mapping of
        ``reserve`` bytes (only the pages written become resident; a larger
        one replaces it if it fills), so closing it gives the memory straight
        back to the system.  Returns (mapping, bytes written); the caller
        closes the mapping.  The kernel fills at most its seq buffer
        (8 pages) per read(2).
        """
        try:
            fd = library().bpf_iter_create(self.fd)
        except LibbpfError as exc:
            raise LibbpfError(exc.errno, f"iterator of {self.program}") from None
        buf = mmap.mmap(-1, max(reserve, 1 << 20))
        used = 0
        try:
            # Bounded: each round reads at least one byte or ends.
            for _ in range(1 << 40):
                if len(buf) - used < (256 << 10):
                    bigger = mmap.mmap(-1, 2 * len(buf))
                    bigger[:used] = buf[:used]
                    buf.close()
                    buf = bigger
                with memoryview(buf) as view:
                    n = os.readv(fd, [view[used:]])
                if n == 0:
                    break
                used += n
        except OSError as exc:
            buf.close()
            raise LibbpfError(exc.errno or errno_mod.EIO, f"reading iterator of {self.program}") from None
        except BaseException:
            buf.close()
            raise
        finally:
            os.close(fd)
        return buf, used

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class Program:
    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self._obj = obj
        self._ptr = ptr

    @property
    def name(self) -> str:
        return library().bpf_program__name(self._ptr).decode()

    @property
    def section(self) -> str:
        return library().bpf_program__section_name(self._ptr).decode()

    @property
    def autoload(self) -> bool:
        return bool(library().bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        library().bpf_program__set_autoload(self._ptr, value)

    @property
    def fd(self) -> int:
        return library().bpf_program__fd(self._ptr)

    def attach(self) -> Link:
        clear_log()
        try:
            ptr = library().bpf_program__attach(self._ptr)
        except LibbpfError as exc:
            raise LibbpfError(exc.errno, f"attach {self.name} ({self.section})", exc.log) from None
        return Link(ptr, self.name)

    def attach_iter(self, pid: int | None = None) -> Link:
        """Attach an ``iter/*`` program: over every task (and object), or,
        for a task iterator given ``pid``, over that one process's threads
        only (``bpf_iter_link_info.task.pid``, v6.1: the kernel visits no
        other task)."""
        clear_log()
        opts = None
        if pid is not None:
            info = IterLinkInfo(tid=0, pid=int(pid), pid_fd=0)
            opts = IterAttachOpts(sz=ctypes.sizeof(IterAttachOpts), link_info=ctypes.addressof(info),
                                  link_info_len=ctypes.sizeof(info))
        try:
            ptr = library().bpf_program__attach_iter(self._ptr, ctypes.byref(opts) if opts is not None else None)
        except LibbpfError as exc:
            what = f"attach iterator {self.name} ({self.section})" + (f" to pid {pid}" if pid is not None else "")
            raise LibbpfError(exc.errno, what, exc.log) from None
        return Link(ptr, self.name)

    def info(self) -> ProgInfo:
        info = ProgInfo()
        size = c_uint32(ctypes.sizeof(info))
        rc = library().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size))
        if rc < 0:
            raise LibbpfError(_errno_of(rc), f"prog info {self.name}")
        return info


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (include/uapi/linux/bpf.h): the kernel
    fills as much as we ask for."""

    _fields_ = [("type", c_uint32), ("id", c_uint32), ("key_size", c_uint32), ("value_size", c_uint32),
                ("max_entries", c_uint32), ("map_flags", c_uint32), ("name", ctypes.c_char * 16)]


def map_ids() -> Iterator[int]:
    """IDs of every BPF map on the host (needs CAP_SYS_ADMIN).  Bounded by the ID space."""
    lib = library()
    cur = c_uint32(0)
    for _ in range(1 << 24):
        rc = lib.bpf_map_get_next_id(cur.value, ctypes.byref(cur))
        if rc < 0:
            err = _errno_of(rc)
            if err == errno_mod.ENOENT:  # the last one
                return
            raise LibbpfError(err, "list BPF maps")
        yield cur.value


class Map:
    def __init__(self, obj: BpfObject, ptr: int, name: str) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return library().bpf_map__fd(self._ptr)

    @property
    def max_entries(self) -> int:
        return library().bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, n: int) -> None:
        library().bpf_map__set_max_entries(self._ptr, n)

    @property
    def flags(self) -> int:
        """map_flags at creation (BPF_F_*); set before the object loads."""
        return library().bpf_map__map_flags(self._ptr)

    @flags.setter
    def flags(self, flags: int) -> None:
        library().bpf_map__set_map_flags(self._ptr, flags)

    @property
    def key_size(self) -> int:
        return library().bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return library().bpf_map__value_size(self._ptr)

    def set_initial_value(self, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        library().bpf_map__set_initial_value(self._ptr, buf, len(data))

    def mapping(self, size: int) -> mmap.mmap:
        """A read-only shared mapping of the first ``size`` bytes of this
        (BPF_F_MMAPABLE) map: one per object and map, whoever asks (see
        :meth:`BpfObject.mapping`)."""
        return self._obj.mapping(self.name, self.fd, size)

    def initial_value_size(self) -> int:
        size = c_size_t(0)
        library().bpf_map__initial_value(self._ptr, ctypes.byref(size))
        return size.value

    def lookup(self, key: bytes, value_size: int) -> bytes | None:
        """One element, or None when absent.  value_size covers all CPUs."""
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(value_size)
        rc = library().bpf_map_lookup_elem(self.fd, kbuf, vbuf)
        if rc < 0:
            err = _errno_of(rc)
            if err == errno_mod.ENOENT:
                return None
            raise LibbpfError(err, f"lookup in {self.name}")
        return vbuf.raw

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(value, len(value))
        rc = library().bpf_map_update_elem(self.fd, kbuf, vbuf, flags)
        if rc < 0:
            raise LibbpfError(_errno_of(rc), f"update in {self.name}")

    def delete(self, key: bytes) -> bool:
        kbuf = ctypes.create_string_buffer(key, len(key))
        rc = library().bpf_map_delete_elem(self.fd, kbuf)
        if rc < 0:
            err = _errno_of(rc)
            if err == errno_mod.ENOENT:
                return False
            raise LibbpfError(err, f"delete in {self.name}")
        return True

    def dump(self, value_size: int, chunk: int = 8192) -> tuple[bytes, bytes, int]:
        """Every (key, value) with BPF_MAP_LOOKUP_BATCH, ``chunk`` at a time.

        Returns (keys, values, count) as packed buffers, so callers can view
        them with numpy instead of decoding element by element.  A poll loop
        should prefer :meth:`dump_into` (buffers kept between reads, one
        call).  Falls back to get_next_key + lookup on kernels without batch
        ops (< 5.6).
        """
        keys_parts: list[bytes] = []
        vals_parts: list[bytes] = []
        total = 0
        for kbuf, vbuf, n in self.batches(value_size, chunk):
            keys_parts.append(bytes(kbuf[: n * self.key_size]))
            vals_parts.append(bytes(vbuf[: n * value_size]))
            total += n
        return b"".join(keys_parts), b"".join(vals_parts), total

    def batches(self, value_size: int, chunk: int = 8192) -> Iterator[tuple[memoryview, memoryview, int]]:
        """One pass over the map, ``chunk`` entries at a time: yields (keys,
        values, count), the first ``count`` entries of two buffers that the
        next batch overwrites, so a caller reducing them holds one chunk,
        not the table.  Without batch ops (< 5.6): one batch of everything.
        """
        lib = library()
        ksz = self.key_size
        in_batch = ctypes.create_string_buffer(8)
        out_batch = ctypes.create_string_buffer(8)
        kbuf = ctypes.create_string_buffer(ksz * chunk)
        vbuf = ctypes.create_string_buffer(value_size * chunk)
        opts = BpfMapBatchOpts(ctypes.sizeof(BpfMapBatchOpts), 0, 0)
        first = True
        # Bounded: each round consumes at least one bucket of the table.
        for _ in range(1 << 24):
            count = c_uint32(chunk)
            rc = lib.bpf_map_lookup_batch(
                self.fd, None if first else in_batch, out_batch, kbuf, vbuf, ctypes.byref(count), ctypes.byref(opts)
            )
            err = _errno_of(rc) if rc < 0 else 0
            if err and err not in (errno_mod.ENOENT, errno_mod.ENOSPC):
                if first and err in (errno_mod.EINVAL, 524):  # 524: ENOTSUPP (kernel-internal)
                    keys, vals, n = self._dump_slow(value_size)
                    yield memoryview(keys), memoryview(vals), n
                    return
                raise LibbpfError(err, f"batch lookup in {self.name}")
            if err == errno_mod.ENOSPC and count.value == 0:
                # One bucket holds more than `chunk` entries: grow and retry.
                chunk *= 2
                kbuf = ctypes.create_string_buffer(ksz * chunk)
                vbuf = ctypes.create_string_buffer(value_size * chunk)
                continue
            if count.value:
                yield memoryview(kbuf).cast("B"), memoryview(vbuf).cast("B"), count.value
            if err == errno_mod.ENOENT:
                return
            ctypes.memmove(in_batch, out_batch, 8)
            first = False
        raise LibbpfError(errno_mod.E2BIG, f"batch lookup in {self.name} did not end")

    def dump_into(self, keys: Any, values: Any, value_size: int) -> tuple[bool, int]:
        """Read every (key, value) into two writable buffers with
        BPF_MAP_LOOKUP_BATCH; as few calls as the buffers allow.

        Returns (complete, count): ``complete`` is False when the buffers
        filled up before the walk ended (grow them and call again; a walk
        always starts over, so the result is one pass over the table).

        The kernel walks the hash table bucket by bucket and copies whole
        buckets (kernel/bpf/hashtab.c, __htab_map_lookup_and_delete_batch),
        so one call can return the whole table; it fails with ENOSPC only
        when not even the next bucket fits.  Falls back to get_next_key +
        lookup on kernels without batch ops (< 5.6).
        """
        lib = library()
        ksz = self.key_size
        kview = memoryview(keys).cast("B")
        vview = memoryview(values).cast("B")
        cap = min(len(kview) // ksz, len(vview) // value_size)
        kaddr = ctypes.addressof(ctypes.c_char.from_buffer(kview)) if cap else 0
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(vview)) if cap else 0
        in_batch = ctypes.c_uint64(0)
        out_batch = ctypes.c_uint64(0)
        opts = BpfMapBatchOpts(ctypes.sizeof(BpfMapBatchOpts), 0, 0)
        total = 0
        first = True
        # Bounded: each round consumes at least one bucket, or the buffer is full.
        for _ in range(1 << 24):
            if total >= cap:
                return False, total
            count = c_uint32(cap - total)
            rc = lib.bpf_map_lookup_batch(
                self.fd, None if first else ctypes.byref(in_batch), ctypes.byref(out_batch),
                kaddr + total * ksz, vaddr + total * value_size, ctypes.byref(count), ctypes.byref(opts),
            )
            err = _errno_of(rc) if rc < 0 else 0
            if err and err not in (errno_mod.ENOENT, errno_mod.ENOSPC):
                if first and err in (errno_mod.EINVAL, 524):  # 524: ENOTSUPP (kernel-internal)
                    return self._dump_slow_into(kview, vview, value_size, cap)
                raise LibbpfError(err, f"batch lookup in {self.name}")
            total += count.value
            if err == errno_mod.ENOENT:
                return True, total
            if err == errno_mod.ENOSPC and count.value == 0:
                return False, total  # the next bucket does not fit
            in_batch.value = out_batch.value
            first = False
        raise LibbpfError(errno_mod.E2BIG, f"batch lookup in {self.name} did not end")

    def _dump_slow_into(self, kview: memoryview, vview: memoryview, value_size: int, cap: int) -> tuple[bool, int]:
        keys, vals, n = self._dump_slow(value_size)
        if n > cap:
            return False, 0
        kview[: len(keys)] = keys
        vview[: len(vals)] = vals
        return True, n

    def update_batch(self, keys: Any, values: Any, count: int, elem_flags: int = 0
                     ) -> tuple[int, list[tuple[int, int]]]:
        """Write ``count`` packed (key, value) pairs with BPF_MAP_UPDATE_BATCH.

        The kernel accepts no BPF_NOEXIST/BPF_EXIST here: ``elem_flags`` may
        only be BPF_F_LOCK (kernel/bpf/syscall.c, generic_map_update_batch
        returns EINVAL otherwise), so every element is written as with
        BPF_ANY.  A batch stops at the first element that fails and reports
        how many went in before it; the failed element is recorded and the
        batch resumes after it, so one failure never hides the rest.

        ``keys`` and ``values`` are writable buffers (numpy arrays, bytearray).
        Returns (written, [(index, errno), ...] of every element that failed).
        Kernels without batch ops (< 5.6) get one update per element.
        """
        lib = library()
        if count <= 0:
            return 0, []
        ksz, vsz = self.key_size, self.value_size
        kview = memoryview(keys).cast("B")
        vview = memoryview(values).cast("B")
        if len(kview) < count * ksz or len(vview) < count * vsz:
            raise ValueError("update_batch: buffers shorter than count elements")
        kaddr = ctypes.addressof(ctypes.c_char.from_buffer(kview))
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(vview))
        opts = BpfMapBatchOpts(ctypes.sizeof(BpfMapBatchOpts), elem_flags, 0)
        failed: list[tuple[int, int]] = []
        done = 0
        batch = True
        # Bounded: every round writes or skips at least one element.
        for _ in range(count + 1):
            if done >= count:
                break
            if not batch:
                rc = lib.bpf_map_update_elem(self.fd, kaddr + done * ksz, vaddr + done * vsz, elem_flags)
                if rc < 0:
                    failed.append((done, _errno_of(rc)))
                done += 1
                continue
            n = c_uint32(count - done)
            rc = lib.bpf_map_update_batch(self.fd, kaddr + done * ksz, vaddr + done * vsz, ctypes.byref(n),
                                          ctypes.byref(opts))
            if rc >= 0:
                done = count
                break
            err = _errno_of(rc)
            if done == 0 and not failed and err in (errno_mod.EINVAL, 524) and n.value in (0, count):
                if elem_flags:
                    raise LibbpfError(err, f"batch update in {self.name} (elem_flags {elem_flags:#x})")
                batch = False  # no batch ops for this map or kernel: one by one
                continue
            if n.value >= count - done:
                raise LibbpfError(err, f"batch update in {self.name}")
            done += n.value
            failed.append((done, err))
            done += 1
        return count - len(failed), failed


def map_memory(fd: int, size: int) -> mmap.mmap:
    """A read-only shared mapping of the first ``size`` bytes (rounded up
    to a page) of the BPF_F_MMAPABLE map ``fd``."""
    return mmap.mmap(fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


class MapById(Map):
    """A map another process loaded, opened by its ID (needs CAP_SYS_ADMIN):
    the same reads as :class:`Map`.  Close it (or use ``with``)."""

    def __init__(self, map_id: int) -> None:
        fd = library().bpf_map_get_fd_by_id(map_id)
        if fd < 0:
            raise LibbpfError(_errno_of(fd), f"open map id {map_id}")
        self._fd = fd
        info = MapInfo()
        size = c_uint32(ctypes.sizeof(info))
        rc = library().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
        if rc < 0:
            os.close(fd)
            raise LibbpfError(_errno_of(rc), f"map info of id {map_id}")
        self.info = info
        self.id = map_id
        self.name = info.name.decode(errors="replace")

    @property
    def fd(self) -> int:
        return self._fd

    def mapping(self, size: int) -> mmap.mmap:
        """A mapping of its own (no object to share one through); the
        reader keeps it for as long as it reads."""
        return map_memory(self._fd, size)

    @property
    def max_entries(self) -> int:
        return int(self.info.max_entries)

    @property
    def key_size(self) -> int:
        return int(self.info.key_size)

    @property
    def value_size(self) -> int:
        return int(self.info.value_size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MapById:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BpfObject:
    """An opened (then loaded) BPF object file.  Closing frees everything."""

    def __init__(self, data: bytes, name: str) -> None:
        lib = library()
        self._buf = ctypes.create_string_buffer(data, len(data))
        self._name = name.encode()
        opts = BpfObjectOpenOpts(sz=ctypes.sizeof(BpfObjectOpenOpts), object_name=self._name)
        clear_log()
        self._ptr: int | None = lib.bpf_object__open_mem(self._buf, len(data), ctypes.byref(opts))
        self.loaded = False
        self._mappings: dict[tuple[str, int], mmap.mmap] = {}

    def _p(self) -> int:
        if not self._ptr:
            raise LibbpfError(errno_mod.EBADF, "BPF object is closed")
        return self._ptr

    def programs(self) -> Iterator[Program]:
        lib = library()
        prev = None
        for _ in range(4096):
            ptr = lib.bpf_object__next_program(self._p(), prev)
            if not ptr:
                return
            yield Program(self, ptr)
            prev = ptr

    def program(self, name: str) -> Program:
        return Program(self, library().bpf_object__find_program_by_name(self._p(), name.encode()))

    def map(self, name: str) -> Map:
        return Map(self, library().bpf_object__find_map_by_name(self._p(), name.encode()), name)

    def load(self) -> None:
        clear_log()
        library().bpf_object__load(self._p())
        self.loaded = True

    def mapping(self, name: str, fd: int, size: int) -> mmap.mmap:
        """The shared read-only mapping of map ``name`` (its ``fd``), the
        first ``size`` bytes rounded up to a page, made on first use.  Every
        reader in the process shares it: each mapping of the same pages
        counts in the process's RSS on its own (`tracer export`'s scrape and
        scan thread each mapping the 2.4 MiB nursery counted it twice).
        Dropped at :meth:`close`; arrays still viewing it keep it mapped."""
        key = (name, size)
        mm = self._mappings.get(key)
        if mm is None:
            mm = self._mappings.setdefault(key, map_memory(fd, size))  # two threads at once: one is kept
        return mm

    def close(self) -> None:
        self._mappings.clear()
        if self._ptr:
            library().bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verifier_log() -> str:
    """The tail of what libbpf printed for the last failing call."""
    return _log_tail()
