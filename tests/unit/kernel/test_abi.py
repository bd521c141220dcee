"""The Python mirrors of bpf/pytracer.h match the BTF in the built object."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pytracer.kernel import abi

OBJ = Path(__file__).resolve().parents[3] / "pytracer" / "bpf" / "pytracer.bpf.o"


def btf_structs() -> dict[str, dict]:
    if not OBJ.exists():
        pytest.fail(f"{OBJ} missing: run `make`")
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed")
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(OBJ)], capture_output=True, text=True,
                         check=True).stdout
    types = json.loads(out)["types"]
    return {t["name"]: t for t in types if t.get("kind") == "STRUCT"}


@pytest.mark.parametrize("cname,pytype", [
    ("pt_sock", abi.PtSock), ("pt_hist", abi.PtHist), ("pt_agg", abi.PtAgg), ("pt_config", abi.PtConfig),
    ("pt_listen_key", abi.PtListenKey), ("pt_svc_key", abi.PtSvcKey), ("pt_svc", abi.PtSvc),
    ("pt_tree", abi.PtTree),
])
def test_struct_layout_matches_btf(cname: str, pytype: type[ctypes.Structure]) -> None:
    st = btf_structs()[cname]
    assert st["size"] == ctypes.sizeof(pytype)
    for m in st["members"]:
        field = getattr(pytype, m["name"])
        assert field.offset * 8 == m["bits_offset"], m["name"]
    assert [m["name"] for m in st["members"]] == [f[0] for f in pytype._fields_]


def test_constants_match_header() -> None:
    header = (Path(__file__).resolve().parents[3] / "bpf" / "pytracer.h").read_text()
    for name in ("PT_STATES", "PT_HIST_SLOTS", "PT_HISTORY", "PT_HIST_STATE", "PT_HIST_LIFETIME",
                 "PT_AGG_ENTRIES", "PT_SVC_SLOTS"):
        line = next(x for x in header.splitlines() if x.startswith((f"#define {name}\t", f"#define {name} ")))
        assert int(line.split()[2]) == getattr(abi, name), name
    for stat in abi.Stat:
        assert f"PT_S_{stat.name}" in header
        line = next(x for x in header.splitlines() if f"PT_S_{stat.name}\t" in x or f"PT_S_{stat.name} " in x)
        assert int(line.split("=")[1].split(",")[0]) == stat.value, stat


def test_enders_and_roles_match_header() -> None:
    header = (Path(__file__).resolve().parents[3] / "bpf" / "pytracer.h").read_text()
    for prefix, enum_ in (("PT_END_", abi.Ender), ("PT_ROLE_", abi.Role)):
        for member in enum_:
            line = next(x for x in header.splitlines() if f"{prefix}{member.name}\t" in x)
            assert int(line.split("=")[1].split(",")[0]) == member.value, member
    line = next(x for x in header.splitlines() if "PT_ENDERS\t" in x)
    assert int(line.split("=")[1].split(",")[0]) == abi.PT_ENDERS


def _member_offsets(types: dict[int, dict], type_id: int, base: int = 0) -> dict[str, int]:
    """Bit offsets of every named member under a struct or union, anonymous
    members flattened in, nested named ones as dotted paths."""
    t = types[type_id]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
        t = types[t["type_id"]]
    out: dict[str, int] = {}
    for m in t.get("members", []):
        off = base + m["bits_offset"]
        inner = types[m["type_id"]]
        if inner["kind"] in ("STRUCT", "UNION"):
            sub = _member_offsets(types, m["type_id"], off)
            prefix = f"{m['name']}." if m["name"] and m["name"] != "(anon)" else ""
            out.update({prefix + k: v for k, v in sub.items()})
        if m["name"] and m["name"] != "(anon)":
            out[m["name"]] = off
    return out


def test_kprobe_link_info_layout_matches_the_running_kernel() -> None:
    """libbpf.PerfLinkInfo against struct bpf_link_info in this kernel's BTF."""
    from pytracer.kernel import libbpf

    vmlinux = Path("/sys/kernel/btf/vmlinux")
    if not vmlinux.exists() or not shutil.which("bpftool"):
        pytest.skip("no kernel BTF or no bpftool")
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(vmlinux)], capture_output=True, text=True,
                         check=True).stdout
    types = {t["id"]: t for t in json.loads(out)["types"]}
    info = next(i for i, t in types.items() if t["kind"] == "STRUCT" and t["name"] == "bpf_link_info")
    offsets = _member_offsets(types, info)
    if "perf_event.kprobe.missed" not in offsets:
        pytest.skip("this kernel's bpf_link_info has no kprobe miss count (before 6.7)")
    want = {"type": "type", "id": "id", "prog_id": "prog_id", "perf_event_type": "perf_event.type",
            "func_name": "perf_event.kprobe.func_name", "name_len": "perf_event.kprobe.name_len",
            "offset": "perf_event.kprobe.offset", "addr": "perf_event.kprobe.addr",
            "missed": "perf_event.kprobe.missed", "cookie": "perf_event.kprobe.cookie"}
    for ours, theirs in want.items():
        assert getattr(libbpf.PerfLinkInfo, ours).offset * 8 == offsets[theirs], ours
