#!/usr/bin/env python3
"""Where pytracer's BPF programs spend their time under a connection storm,
line by line of bpf/*.c, and how much of the host's CPU they take.

    python3 bench/harness/bpflines.py [--seconds 6] [--top 15] [-- TRACER ARGS...]

Starts nginx (no keep-alive) and `tracer watch --interval 3600 --no-leaks`
(the kernel side alone; other tracer arguments after --), drives `ab -c 16`
at saturation, and samples every CPU with `perf record -e cpu-clock` for
SECONDS.  Each sample inside one of the tracer's programs is charged to the
source line the JIT compiled it from: the program's jited line info (the
address each BPF line begins at) and its BTF (file and line text), read
while it is loaded.  A load that stalls (a cache miss, the clock) is charged
to the line of the instruction that waits.

Prints, per program, its share of every CPU sample and its hottest lines;
then the share of the kernel's BPF entry code (trampolines, bpf_trace_run).
Everything it started is stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib import TRACER, BenchError, Proc, loaded_progs, running, start_nginx  # noqa: E402

PORT = 18093
# struct bpf_prog_info (include/uapi/linux/bpf.h): the offsets of the fields read here.
INFO_SIZE = 256
OFF = {"jited_prog_len": 16, "name": 64, "btf_id": 128, "nr_line_info": 148, "line_info": 152,
       "jited_line_info": 160, "nr_jited_line_info": 168, "line_info_rec_size": 172,
       "jited_line_info_rec_size": 176}
# Kernel code that runs a tracing program on every event, whatever it does.
ENTRY = ("bpf_trace_run", "__bpf_prog_enter", "__bpf_prog_exit", "bpf_tramp")


class ProgLines:
    """A loaded program's jited addresses mapped to its source lines."""

    def __init__(self, lib: ctypes.CDLL, prog_id: int) -> None:
        fd = lib.bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            raise BenchError(f"program {prog_id} is gone")
        info = ctypes.create_string_buffer(INFO_SIZE)
        size = ctypes.c_uint32(INFO_SIZE)
        if lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)):
            raise BenchError(f"no info for program {prog_id}")

        def u32(buf: ctypes.Array, field: str) -> int:
            return int.from_bytes(buf.raw[OFF[field]:OFF[field] + 4], "little")

        self.name = info.raw[OFF["name"]:OFF["name"] + 16].split(b"\0")[0].decode()
        n, rec = u32(info, "nr_line_info"), u32(info, "line_info_rec_size")
        nj, jrec = u32(info, "nr_jited_line_info"), u32(info, "jited_line_info_rec_size")
        lines, jited = ctypes.create_string_buffer(n * rec), ctypes.create_string_buffer(nj * jrec)
        ask = ctypes.create_string_buffer(INFO_SIZE)
        for field, value, width in (("nr_line_info", n, 4), ("line_info", ctypes.addressof(lines), 8),
                                    ("line_info_rec_size", rec, 4), ("nr_jited_line_info", nj, 4),
                                    ("jited_line_info", ctypes.addressof(jited), 8),
                                    ("jited_line_info_rec_size", jrec, 4)):
            ask[OFF[field]:OFF[field] + width] = value.to_bytes(width, "little")
        size = ctypes.c_uint32(INFO_SIZE)
        rc = lib.bpf_obj_get_info_by_fd(fd, ask, ctypes.byref(size))
        os.close(fd)
        btf_id = u32(info, "btf_id")
        if rc or not n or n != nj:
            raise BenchError(f"{self.name}: no line info (rc {rc}, {n} lines, {nj} jited)")
        lib.btf__load_from_kernel_by_id.restype = ctypes.c_void_p
        lib.btf__name_by_offset.restype = ctypes.c_char_p
        lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.btf__free.argtypes = [ctypes.c_void_p]
        btf = lib.btf__load_from_kernel_by_id(btf_id)
        if not btf:
            raise BenchError(f"{self.name}: BTF {btf_id} not readable")
        try:
            text = []
            for i in range(n):
                _, file_off, line_off, line_col = (int.from_bytes(lines.raw[i * rec + 4 * k:i * rec + 4 * k + 4],
                                                                  "little") for k in range(4))
                src = (lib.btf__name_by_offset(btf, line_off) or b"").decode(errors="replace").strip()
                where = Path((lib.btf__name_by_offset(btf, file_off) or b"?").decode()).name
                text.append(f"{where}:{line_col >> 10}  {src}")
        finally:
            lib.btf__free(btf)
        addrs = [int.from_bytes(jited.raw[i * jrec:i * jrec + 8], "little") for i in range(nj)]
        order = sorted(range(nj), key=lambda i: addrs[i])
        self.starts = [addrs[i] for i in order]
        self.text = [text[i] for i in order]
        self.end = self.starts[-1] + u32(info, "jited_prog_len")  # an upper bound

    def line_of(self, ip: int) -> str | None:
        if not self.starts or ip < self.starts[0] or ip >= self.end:
            return None
        return self.text[bisect.bisect_right(self.starts, ip) - 1]


def samples(seconds: float, out: Path) -> list[tuple[int, str]]:
    subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-a", "-o", str(out), "--",
                    "sleep", str(seconds)], check=True, capture_output=True, timeout=seconds + 60)
    text = subprocess.run(["perf", "script", "-i", str(out), "-F", "ip,sym"], capture_output=True, text=True,
                          timeout=300).stdout
    got = []
    for line in text.splitlines():
        parts = line.split(None, 1)
        if parts:
            got.append((int(parts[0], 16), parts[1].strip() if len(parts) > 1 else ""))
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--top", type=int, default=15, help="lines shown per program")
    ap.add_argument("tracer_args", nargs="*", help="instead of --interval 3600 --no-leaks (after --)")
    a = ap.parse_args()
    lib = ctypes.CDLL("libbpf.so.1")
    d = Path(tempfile.mkdtemp(prefix="pytracer-bpflines-"))
    nginx = start_nginx(d, PORT, keepalive=False)
    tracer = Proc([TRACER, "watch", *(a.tracer_args or ["--interval", "3600", "--no-leaks"])], name="tracer",
                  stdin=False)
    with running(nginx, tracer):
        progs = []
        for prog_id in loaded_progs(tracer):
            try:
                progs.append(ProgLines(lib, prog_id))
            except BenchError as exc:
                print(f"(skipped: {exc})", file=sys.stderr)
        ab = Proc(["ab", "-q", "-t", str(int(a.seconds + 4)), "-n", "100000000", "-c", "16",
                   f"http://127.0.0.1:{PORT}/"], name="ab", stdin=False)
        with running(ab):
            time.sleep(1.5)
            got = samples(a.seconds, d / "perf.data")
    total = len(got)
    if not total:
        raise BenchError("perf recorded no samples")
    print(f"{total} samples on every CPU in {a.seconds:g} s, tracer `{' '.join(tracer.argv[1:])}`, "
          f"ab -c 16 against nginx (no keep-alive)")
    entry = sum(1 for _, sym in got if sym.startswith(ENTRY))
    print(f"  kernel entry code for BPF programs ({', '.join(ENTRY)}): {100 * entry / total:.2f}%")
    for prog in progs:
        lines = collections.Counter(ln for ip, _ in got if (ln := prog.line_of(ip)) is not None)
        n = sum(lines.values())
        if not n:
            continue
        print(f"\n{prog.name}: {100 * n / total:.2f}% of all samples ({n})")
        for ln, c in lines.most_common(a.top):
            print(f"  {100 * c / n:5.1f}%  {ln[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
