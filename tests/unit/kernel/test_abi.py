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
