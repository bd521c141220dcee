#!/usr/bin/env python3
"""Probe which BPF attach modes and features the running kernel really supports.

Used by vagrant/guest/guest-test inside the test VM as an independent check of the
kernel, needing neither clang nor libbpf nor the project's code: each probe
hand-assembles a few BPF instructions, loads them with the bpf(2) syscall,
attaches them the way libbpf would, opens a loopback TCP connection and reads
back from a map how often the program ran. A probe passes only if the program
loaded, attached *and* fired.

    python3 vagrant/guest/bpfprobe.py [PROBE ...]      # default: all probes

Probes:
  btf         /sys/kernel/btf/vmlinux present and parseable
  tracepoint  BPF_PROG_TYPE_TRACEPOINT on sock/inet_sock_set_state (perf event)
  tp_btf      BPF_PROG_TYPE_TRACING / BPF_TRACE_RAW_TP on inet_sock_set_state
  fentry      BPF_PROG_TYPE_TRACING / BPF_TRACE_FENTRY on tcp_close
  kprobe      BPF_PROG_TYPE_KPROBE on tcp_set_state (kprobe PMU perf event)
  cookie      bpf_get_socket_cookie(sk) in a tp_btf program; the cookies seen
              must include the client socket's SO_COOKIE (ground truth)
  ringbuf     BPF_MAP_TYPE_RINGBUF can be created

Each probe prints one line "bpfprobe: NAME: ok|absent|FAIL: detail". A probe
whose feature the kernel version should have (per the kernel history in
shared/DESIGN.md) but does not, is FAIL; one that the kernel is too old for
is "absent". Exit status: 0 if no probe failed, 1 otherwise.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
NR_PERF_EVENT_OPEN = 298
NR_BPF = 321

# enum bpf_cmd, bpf_prog_type, bpf_attach_type, bpf_map_type (include/uapi/linux/bpf.h)
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_GET_NEXT_KEY = 0, 1, 4
BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 5, 17
PROG_KPROBE, PROG_TRACEPOINT, PROG_TRACING = 2, 5, 26
TRACE_RAW_TP, TRACE_FENTRY = 23, 24
MAP_HASH, MAP_ARRAY, MAP_RINGBUF = 1, 2, 27
# helper ids (enum bpf_func_id)
FN_MAP_LOOKUP, FN_MAP_UPDATE, FN_GET_SOCKET_COOKIE = 1, 2, 46

# perf_event (include/uapi/linux/perf_event.h)
PERF_TYPE_TRACEPOINT = 2
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
PERF_FLAG_FD_CLOEXEC = 8
SO_COOKIE = 57  # include/uapi/asm-generic/socket.h

TRACEFS = "/sys/kernel/tracing"
BTF_PATH = "/sys/kernel/btf/vmlinux"


class ProbeError(Exception):
    """A step of a probe failed; the message says which and why."""


class Absent(Exception):
    """The kernel lacks the feature, as expected for its version."""


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def sys_bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = LIBC.syscall(NR_BPF, cmd, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One struct bpf_insn: u8 code, u8 dst:4 src:4, s16 off, s32 imm."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_map_fd(dst: int, fd: int) -> bytes:
    """BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD: two instruction slots."""
    return insn(0x18, dst, 1, 0, fd) + insn(0, 0, 0, 0, 0)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    attr = struct.pack("<IIIII", map_type, key_size, value_size, max_entries, 0)
    return sys_bpf(BPF_MAP_CREATE, attr.ljust(72, b"\0"))


def map_lookup_u64(fd: int, key: bytes) -> int:
    value = ctypes.create_string_buffer(8)
    kbuf = ctypes.create_string_buffer(key, len(key))
    attr = struct.pack("<IIQQQ", fd, 0, ctypes.addressof(kbuf), ctypes.addressof(value), 0)
    sys_bpf(BPF_MAP_LOOKUP_ELEM, attr)
    return int(struct.unpack("<Q", value.raw)[0])


def map_keys_u64(fd: int, limit: int = 4096) -> list[int]:
    keys: list[int] = []
    nxt = ctypes.create_string_buffer(8)
    prev = None
    for _ in range(limit):  # bounded walk
        kaddr = ctypes.addressof(prev) if prev is not None else 0
        attr = struct.pack("<IIQQQ", fd, 0, kaddr, ctypes.addressof(nxt), 0)
        try:
            sys_bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError:
            break
        keys.append(int(struct.unpack("<Q", nxt.raw)[0]))
        prev = ctypes.create_string_buffer(nxt.raw, 8)
    return keys


def prog_load(prog_type: int, insns: bytes, attach_type: int = 0, btf_id: int = 0) -> int:
    """BPF_PROG_LOAD; on failure raise ProbeError with the verifier log's tail."""
    license_ = ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))

    def attempt(log_level: int, log: ctypes.Array | None) -> int:
        attr = struct.pack(
            "<IIQQIIQII16sIIIIQIIQIII",
            prog_type, len(insns) // 8, ctypes.addressof(code), ctypes.addressof(license_),
            log_level, len(log) if log else 0, ctypes.addressof(log) if log else 0,
            0, 0, b"pytracer_probe",
            0, attach_type, 0, 0, 0, 0, 0, 0, 0, btf_id, 0,
        )
        return sys_bpf(BPF_PROG_LOAD, attr.ljust(128, b"\0"))

    try:
        return attempt(0, None)
    except OSError as first:
        log = ctypes.create_string_buffer(1 << 16)
        try:
            return attempt(1, log)
        except OSError:
            pass
        lines = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise ProbeError(f"prog load: {first.strerror}: {' | '.join(lines)}") from None


def perf_event_open(ev_type: int, config: int, config1: int = 0) -> int:
    # struct perf_event_attr, PERF_ATTR_SIZE_VER5 = 112 bytes
    attr = struct.pack("<IIQQQQQIIQQ", ev_type, 112, config, 1, 0, 0, 0, 1, 0, config1, 0)
    buf = ctypes.create_string_buffer(attr.ljust(112, b"\0"), 112)
    fd = LIBC.syscall(NR_PERF_EVENT_OPEN, buf, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise ProbeError(f"perf_event_open: {os.strerror(err)}")
    return int(fd)


def attach_perf(prog_fd: int, ev_fd: int) -> None:
    import fcntl

    try:
        fcntl.ioctl(ev_fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(ev_fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as exc:
        raise ProbeError(f"perf ioctl attach: {exc.strerror}") from None


def raw_tp_open(prog_fd: int) -> int:
    """BPF_RAW_TRACEPOINT_OPEN with name NULL: the attach for tp_btf and fentry."""
    try:
        return sys_bpf(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QII", 0, prog_fd, 0))
    except OSError as exc:
        raise ProbeError(f"attach: {exc.strerror}") from None


# ---- BTF: find type ids by name in the kernel's BTF (include/uapi/linux/btf.h)

BTF_KIND_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}  # fixed trailing bytes per kind
BTF_KIND_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # bytes per member


def btf_find(wanted: dict[str, int]) -> dict[str, int]:
    """Map name -> type id for the (name, kind) pairs in `wanted` (kind by number)."""
    try:
        with open(BTF_PATH, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise Absent(f"no kernel BTF ({exc.strerror})") from None
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", data
    )
    if magic != 0xEB9F:
        raise ProbeError("bad BTF magic")
    types, strs = hdr_len + type_off, hdr_len + str_off
    pos, end, type_id = types, types + type_len, 1
    found: dict[str, int] = {}
    while pos < end and len(found) < len(wanted):
        name_off, info, _ = struct.unpack_from("<III", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if name_off:
            name_end = data.index(b"\0", strs + name_off)
            name = data[strs + name_off:name_end].decode()
            if wanted.get(name) == kind:
                found[name] = type_id
        pos += 12 + BTF_KIND_EXTRA.get(kind, 0) + BTF_KIND_PER_VLEN.get(kind, 0) * vlen
        type_id += 1
    missing = set(wanted) - set(found)
    if missing:
        raise ProbeError(f"not in kernel BTF: {', '.join(sorted(missing))}")
    return found


BTF_KIND_TYPEDEF, BTF_KIND_FUNC = 8, 12


# ---- programs

def count_prog(map_fd: int) -> bytes:
    """counts[0] += 1 (array map), return 0. Valid for any program type."""
    return b"".join([
        insn(0x62, 10, 0, -4, 0),        # *(u32 *)(r10 - 4) = 0
        insn(0xBF, 2, 10),               # r2 = r10
        insn(0x07, 2, 0, 0, -4),         # r2 += -4
        ld_map_fd(1, map_fd),            # r1 = map
        insn(0x85, 0, 0, 0, FN_MAP_LOOKUP),
        insn(0x15, 0, 0, 2, 0),          # if r0 == 0 goto +2
        insn(0xB7, 1, 0, 0, 1),          # r1 = 1
        insn(0xDB, 0, 1, 0, 0),          # lock *(u64 *)(r0 + 0) += r1
        insn(0xB7, 0, 0, 0, 0),          # r0 = 0
        insn(0x95),                      # exit
    ])


def cookie_prog(map_fd: int) -> bytes:
    """seen[bpf_get_socket_cookie(ctx[0])] = 1 for tp_btf/inet_sock_set_state (arg 0 = sk)."""
    return b"".join([
        insn(0x79, 1, 1, 0),             # r1 = *(u64 *)(r1 + 0)   sk
        insn(0x85, 0, 0, 0, FN_GET_SOCKET_COOKIE),
        insn(0x7B, 10, 0, -8),           # *(u64 *)(r10 - 8) = r0  key
        insn(0x7A, 10, 0, -16, 1),       # *(u64 *)(r10 - 16) = 1  value
        insn(0xBF, 2, 10),
        insn(0x07, 2, 0, 0, -8),         # r2 = &key
        insn(0xBF, 3, 10),
        insn(0x07, 3, 0, 0, -16),        # r3 = &value
        insn(0xB7, 4, 0, 0, 0),          # r4 = BPF_ANY
        ld_map_fd(1, map_fd),
        insn(0x85, 0, 0, 0, FN_MAP_UPDATE),
        insn(0xB7, 0, 0, 0, 0),
        insn(0x95),
    ])


def loopback_traffic() -> int:
    """One loopback TCP connection, data both ways, closed by both ends.
    Returns the client socket's SO_COOKIE (0 if the kernel has none)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(5)
        cli = socket.create_connection(srv.getsockname(), timeout=5)
        conn, _ = srv.accept()
        try:
            cookie = struct.unpack("<Q", cli.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
        except OSError:
            cookie = 0
        cli.sendall(b"ping")
        conn.recv(4)
        conn.sendall(b"pong")
        cli.recv(4)
        cli.close()
        conn.close()
    time.sleep(0.2)
    return int(cookie)


class Fds:
    """Closes every fd it was given (detaching programs) on exit."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def __enter__(self) -> Fds:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in reversed(self.fds):
            os.close(fd)


def run_counting(load_and_attach: Callable[[Fds, int], None]) -> str:
    with Fds() as fds:
        counts = fds.add(map_create(MAP_ARRAY, 4, 8, 1))
        load_and_attach(fds, counts)
        before = map_lookup_u64(counts, b"\0" * 4)
        loopback_traffic()
        fired = map_lookup_u64(counts, b"\0" * 4) - before
    if fired <= 0:
        raise ProbeError("attached but never fired during a loopback connection")
    return f"fired {fired}x"


# ---- probes

def probe_btf() -> str:
    ids = btf_find({"tcp_close": BTF_KIND_FUNC})
    return f"{BTF_PATH} ({os.path.getsize(BTF_PATH)} bytes, tcp_close id {ids['tcp_close']})"


def probe_tracepoint() -> str:
    def attach(fds: Fds, counts: int) -> None:
        try:
            with open(f"{TRACEFS}/events/sock/inet_sock_set_state/id") as fh:
                tp_id = int(fh.read())
        except OSError as exc:
            raise ProbeError(f"tracepoint id: {exc.strerror} (tracefs mounted?)") from None
        prog = fds.add(prog_load(PROG_TRACEPOINT, count_prog(counts)))
        attach_perf(prog, fds.add(perf_event_open(PERF_TYPE_TRACEPOINT, tp_id)))

    return "sock/inet_sock_set_state " + run_counting(attach)


def probe_tp_btf() -> str:
    if kernel_version() < (5, 5):
        raise Absent("tp_btf needs 5.5")
    ids = btf_find({"btf_trace_inet_sock_set_state": BTF_KIND_TYPEDEF})

    def attach(fds: Fds, counts: int) -> None:
        prog = fds.add(prog_load(PROG_TRACING, count_prog(counts), TRACE_RAW_TP,
                                 ids["btf_trace_inet_sock_set_state"]))
        fds.add(raw_tp_open(prog))

    return "inet_sock_set_state " + run_counting(attach)


def probe_fentry() -> str:
    if kernel_version() < (5, 5):
        raise Absent("fentry needs 5.5")
    ids = btf_find({"tcp_close": BTF_KIND_FUNC})

    def attach(fds: Fds, counts: int) -> None:
        prog = fds.add(prog_load(PROG_TRACING, count_prog(counts), TRACE_FENTRY, ids["tcp_close"]))
        fds.add(raw_tp_open(prog))

    return "tcp_close " + run_counting(attach)


def probe_kprobe() -> str:
    try:
        with open("/sys/bus/event_source/devices/kprobe/type") as fh:
            pmu = int(fh.read())
    except OSError:
        raise ProbeError("no kprobe PMU (CONFIG_KPROBES off?)") from None
    func = ctypes.create_string_buffer(b"tcp_set_state")

    def attach(fds: Fds, counts: int) -> None:
        prog = fds.add(prog_load(PROG_KPROBE, count_prog(counts)))
        attach_perf(prog, fds.add(perf_event_open(pmu, 0, ctypes.addressof(func))))

    return "tcp_set_state " + run_counting(attach)


def probe_cookie() -> str:
    ids = btf_find({"btf_trace_inet_sock_set_state": BTF_KIND_TYPEDEF})
    with Fds() as fds:
        seen = fds.add(map_create(MAP_HASH, 8, 8, 1024))
        try:
            prog = fds.add(prog_load(PROG_TRACING, cookie_prog(seen), TRACE_RAW_TP,
                                     ids["btf_trace_inet_sock_set_state"]))
        except ProbeError as exc:
            if kernel_version() < (5, 12):
                raise Absent(f"verifier refuses the helper before 5.12 ({exc})") from None
            raise
        fds.add(raw_tp_open(prog))
        want = loopback_traffic()
        cookies = map_keys_u64(seen)
    if not want:
        raise ProbeError("getsockopt(SO_COOKIE) gave nothing to compare with")
    if want not in cookies:
        raise ProbeError(f"client cookie {want} not among the {len(cookies)} cookies seen")
    return f"tp_btf saw the client's SO_COOKIE {want} ({len(cookies)} sockets)"


def probe_ringbuf() -> str:
    try:
        fd = map_create(MAP_RINGBUF, 0, 0, 4096)
    except OSError as exc:
        if kernel_version() < (5, 8):
            raise Absent("ring buffer needs 5.8") from None
        raise ProbeError(f"map create: {exc.strerror}") from None
    os.close(fd)
    return "map created"


PROBES: dict[str, Callable[[], str]] = {
    "btf": probe_btf,
    "tracepoint": probe_tracepoint,
    "tp_btf": probe_tp_btf,
    "fentry": probe_fentry,
    "kprobe": probe_kprobe,
    "cookie": probe_cookie,
    "ringbuf": probe_ringbuf,
}


def main(argv: list[str]) -> int:
    names = argv or list(PROBES)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        print(f"bpfprobe: unknown probe(s): {' '.join(unknown)}", file=sys.stderr)
        return 2
    # Before 5.11 BPF memory is charged to RLIMIT_MEMLOCK.
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY,) * 2)
    except (ValueError, OSError):
        pass
    failed = 0
    for name in names:
        try:
            print(f"bpfprobe: {name}: ok: {PROBES[name]()}", flush=True)
        except Absent as exc:
            print(f"bpfprobe: {name}: absent: {exc}", flush=True)
        except (ProbeError, OSError) as exc:
            failed += 1
            print(f"bpfprobe: {name}: FAIL: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
