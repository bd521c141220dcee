"""The bcc backend's pure parts: hook planning, error lines, backend choice.

No root, no bcc and no kernel headers needed; the kernel side is proved in
tests/kernel/test_bcc_backend.py (in the VM).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pytracer.cli.options import Context, make_tracer
from pytracer.kernel import bcc as bb
from pytracer.kernel import hooks
from pytracer.kernel.core import Tracer
from pytracer.kernel.environment import TRACEPOINTS, EnvironmentProblem, Features
from pytracer.kernel.hooks import TracerError

ROOT = Path(__file__).resolve().parents[3]


def features(kprobes: bool = True, tracefs: bool = True, missing: tuple[str, ...] = (),
             version: tuple[int, int] = (5, 10)) -> Features:
    """A BTF-less kernel (5.10) whose tracefs has every tracepoint the hook table names but ``missing``."""
    tps = {tp: tp not in missing for tp in hooks.tracepoints()} if tracefs else {}
    return Features(release=f"{version[0]}.{version[1]}.0-test", version=version, btf=False, tracefs=tracefs,
                    kprobes=kprobes, tracepoints=tps)


def test_the_c_program_uses_the_abi_header_and_the_core_map_names() -> None:
    src = (ROOT / "bpf" / bb.SOURCE_NAME).read_text()
    assert '#include "pytracer.h"' in src
    for decl in (
        'BPF_F_TABLE("hash", u64, struct pt_sock, socks,',
        "BPF_PERCPU_ARRAY(agg, struct pt_agg, 1)",
        "BPF_HASH(owners, u32, u8,",
        "BPF_HASH(listeners, struct pt_listen_key, u32,",
        "BPF_HASH(svc_ports, struct pt_svc_key, u32, PT_SVC_SLOTS)",
        "BPF_PERCPU_ARRAY(svc, struct pt_svc, PT_SVC_SLOTS)",
    ):
        assert decl in src
    # What bpf/lifecycle.bpf.h asks of the including file, for idle before end.
    for accessor in ("#define PT_CFG_HZ", "svc_slot(struct pt_svc_key *k)", "struct pt_svc *svc_get(u32 slot)",
                     "void read_end_facts(struct sock *sk,"):
        assert accessor in src, accessor
    # Every program the planner can attach exists in the source.
    for hook in hooks.HOOKS:
        for c in hooks.candidates(hook, "bcc"):
            for p in c.programs:
                assert f"int {p}(" in src, p


def test_source_is_found_and_matches_the_tree() -> None:
    # `make` copies the source into the package (pytracer/bpf/) so an
    # installed tracer has it; either copy must be today's bpf/ source.
    found = bb.source_path()
    assert found in (ROOT / "bpf" / bb.SOURCE_NAME, ROOT / "pytracer" / "bpf" / bb.SOURCE_NAME)
    assert found.read_text() == (ROOT / "bpf" / bb.SOURCE_NAME).read_text()
    assert (found.parent / "pytracer.h").read_text() == (ROOT / "bpf" / "pytracer.h").read_text()


def test_plan_prefers_tracepoint_then_kprobe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_tp_exists", lambda target: True)
    monkeypatch.setattr(bb, "_tp_has_field", lambda target, field: True)
    t = bb.BccTracer(syscall_hooks=True)
    plan = t._plan(features())
    assert [c.kind for c in plan["state"]] == ["tracepoint", "kprobe"]
    assert [c.kind for c in plan["accept"]] == ["kprobe", "syscall"]
    assert [c.kind for c in plan["close"]] == ["kprobe", "syscall"]
    assert "destroy" not in plan  # a record ends at its transition to CLOSE


def test_plan_without_kprobes_falls_back_with_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_tp_exists", lambda target: True)
    monkeypatch.setattr(bb, "_tp_has_field", lambda target, field: True)
    t = bb.BccTracer(syscall_hooks=True)
    plan = t._plan(features(kprobes=False))
    assert [c.kind for c in plan["accept"]] == ["syscall"]
    assert t.choices["accept"].rejected[0][0] == "kprobe"
    assert "kprobes unavailable" in t.choices["accept"].rejected[0][1]


def test_forced_mode_keeps_only_its_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_tp_exists", lambda target: True)
    monkeypatch.setattr(bb, "_tp_has_field", lambda target, field: True)
    plan = bb.BccTracer(attach="kprobe", syscall_hooks=True)._plan(features())
    assert {h: [c.kind for c in cs] for h, cs in plan.items()} == {
        "state": ["kprobe"], "accept": ["kprobe"], "close": ["kprobe"],
        "reset": ["tracepoint"], "accept_fd": ["syscall"], "listen": ["kprobe"],
    }
    with pytest.raises(TracerError, match="cannot hook inet_sock_set_state / tcp_set_state"):
        bb.BccTracer(attach="kprobe")._plan(features(kprobes=False))


def test_missing_state_hooks_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_tp_exists", lambda target: target != "sock:inet_sock_set_state")
    monkeypatch.setattr(bb, "_tp_has_field", lambda target, field: True)
    with pytest.raises(TracerError) as exc:
        bb.BccTracer()._plan(features(kprobes=False, missing=("sock/inet_sock_set_state",)))
    assert str(exc.value).startswith("cannot hook inet_sock_set_state / tcp_set_state (")
    assert "\n" not in str(exc.value)


def test_btf_only_modes_are_refused_before_anything_loads() -> None:
    with pytest.raises(TracerError, match="no fentry programs"):
        bb.BccTracer(attach="fentry").open()


def test_missing_bcc_module_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)  # makes `import bcc` raise ImportError
    monkeypatch.setattr(bb.os.path, "isdir", lambda p: False)
    with pytest.raises(EnvironmentProblem, match="apt install python3-bpfcc"):
        bb.import_bcc()


def test_missing_headers_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    with pytest.raises(EnvironmentProblem) as exc:
        bb.find_headers("0.0.0-nonexistent")
    assert str(exc.value).endswith("apt install linux-headers-0.0.0-nonexistent")
    assert "\n" not in str(exc.value)


def test_auto_without_btf_says_why_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    t = bb.BccTracer(reason="auto: this kernel has no BTF (/sys/kernel/btf/vmlinux) for the CO-RE backend")
    msg = str(t._problem(EnvironmentProblem("the bcc backend needs X: apt install python3-bpfcc")))
    assert msg.startswith("this kernel has no BTF")
    assert msg.endswith("apt install python3-bpfcc")


def test_make_tracer_picks_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    real_exists = bb.os.path.exists
    assert isinstance(make_tracer(Context(backend="bcc")), bb.BccTracer)
    assert isinstance(make_tracer(Context(backend="core")), Tracer)
    monkeypatch.setattr("pytracer.cli.options.os.path.exists",
                        lambda p: False if p == "/sys/kernel/btf/vmlinux" else real_exists(p))
    t = make_tracer(Context(backend="auto"))
    assert isinstance(t, bb.BccTracer) and t.reason.startswith("auto: this kernel has no BTF")


def test_first_error_is_one_line() -> None:
    lines = [
        "In file included from /virtual/main.c:2:",
        "/usr/src/pytracer_bcc.c:120:9: warning: unused variable 'x'",
        "/usr/src/pytracer_bcc.c:133:2: error: use of undeclared identifier 'sk_protocol'",
        "        READ(protocol, sk->sk_protocol);",
        "1 error generated.",
    ]
    assert bb.first_error(lines) == "pytracer_bcc.c:133:2: use of undeclared identifier 'sk_protocol'"


def test_features_probe_every_tracepoint_the_hook_table_names() -> None:
    # static_veto asks Features; a tracepoint it never probed would read as absent.
    assert set(hooks.tracepoints()) == set(TRACEPOINTS)


def test_without_syscall_hooks_no_syscall_tracepoint_is_planned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_tp_has_field", lambda target, field: True)
    # Without kprobes the only accept and close programs left are syscall
    # tracepoints: the plan leaves those hooks off and says why.
    t = bb.BccTracer(syscall_hooks=False)
    plan = t._plan(features(kprobes=False))
    assert plan["accept"] == [] and plan["close"] == [] and plan["accept_fd"] == []
    for hook in ("accept", "close", "accept_fd"):
        assert (("syscall", hooks.SYSCALL_VETO) in t.choices[hook].rejected), hook
    assert [c.kind for c in plan["state"]] == ["tracepoint"]
    # The state hook is still required.
    with pytest.raises(TracerError, match="cannot hook inet_sock_set_state"):
        bb.BccTracer(syscall_hooks=False)._plan(features(kprobes=False, missing=("sock/inet_sock_set_state",)))


def test_syscall_hooks_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTRACER_SYSCALL_HOOKS", raising=False)
    assert not bb.BccTracer().syscall_hooks and not Tracer().syscall_hooks
    monkeypatch.setenv("PYTRACER_SYSCALL_HOOKS", "1")
    assert bb.BccTracer().syscall_hooks and Tracer().syscall_hooks
    assert not Tracer(syscall_hooks=False).syscall_hooks


def test_following_a_tree_plans_and_compiles_the_fork_twins_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_tp_exists", lambda target: True)
    monkeypatch.setattr(bb, "_tp_has_field", lambda target, field: True)
    src = (ROOT / "bpf" / bb.SOURCE_NAME).read_text()
    plain = bb.BccTracer(pids=[1])
    plain.source = ROOT / "bpf" / bb.SOURCE_NAME
    assert "follow" not in plain._plan(features())
    assert not any("PT_FOLLOW" in f for f in plain._cflags(features()))
    t = bb.BccTracer(pids=[1], follow_forks=True)
    t.source = plain.source
    plan = t._plan(features())
    assert [c.programs for c in plan["follow"]] == [("fork_tracepoint", "exit_tracepoint")]
    for p in plan["follow"][0].programs:
        assert f"int {p}(" in src, p
    assert {"-DPT_FOLLOW=1", f"-DPT_MAX_OWNERS={bb.FOLLOW_MAX_PIDS}"} <= set(t._cflags(features()))
    # The twins sit behind PT_FOLLOW: the default compile is what it was.
    follow = src.index("#ifdef PT_FOLLOW")
    assert src.index("int fork_tracepoint(") > follow and src.index("int exit_tracepoint(") > follow
    with pytest.raises(TracerError, match="needs a pid filter"):
        bb.BccTracer(follow_forks=True)


@pytest.mark.parametrize(("version", "prealloc"), [((5, 10), True), ((6, 0), True), ((6, 1), False)])
def test_socket_table_is_preallocated_before_6_1(monkeypatch: pytest.MonkeyPatch, version: tuple[int, int],
                                                 prealloc: bool) -> None:
    monkeypatch.setattr(bb, "_tp_exists", lambda target: True)
    monkeypatch.setattr(bb, "_tp_has_field", lambda target, field: True)
    t = bb.BccTracer()
    t.source = ROOT / "bpf" / bb.SOURCE_NAME
    t._plan(features(version=version))
    assert (t.table_prealloc is not None) is prealloc
    assert ("-DPT_SOCKS_FLAGS=0" in t._cflags(features(version=version))) is prealloc
    src = t.source.read_text()
    assert "socks, PT_MAX_SOCKETS, PT_SOCKS_FLAGS)" in src and "#define PT_SOCKS_FLAGS\t\tBPF_F_NO_PREALLOC" in src
