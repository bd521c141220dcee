"""pytracer.kernel.hooks: the one hook table both backends plan from.  Pure."""

import pytest

from pytracer.kernel import hooks
from pytracer.kernel.environment import Features


def features(**kw: object) -> Features:
    base = dict(release="6.18.0-test", version=(6, 18), btf=True, tracefs=True, kprobes=False,
                tracepoints={tp: True for tp in hooks.tracepoints()})
    base.update(kw)
    return Features(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", hooks.BACKENDS)
def test_every_hook_has_a_candidate_per_backend_and_names_are_unique_per_kind(backend: str) -> None:
    for hook in hooks.HOOKS:
        if hook == "reset" and backend == "core":
            continue
        assert hooks.candidates(hook, backend), (hook, backend)
    assert all(c.backends <= set(hooks.BACKENDS) for cs in hooks.HOOKS.values() for c in cs)


def test_forced_modes_keep_only_their_kind() -> None:
    for mode, row in hooks.FORCED.items():
        for hook in hooks.HOOKS:
            kinds = {c.kind for c in hooks.candidates(hook, "core", mode)} | {
                c.kind for c in hooks.candidates(hook, "bcc", mode)}
            assert kinds <= {row.get(hook)}, (mode, hook)


def test_syscall_candidates_are_vetoed_unless_opted_in() -> None:
    (sys_close,) = [c for c in hooks.HOOKS["close"] if c.kind == "syscall"]
    assert hooks.static_veto(sys_close, features(), syscall_hooks=False) == hooks.SYSCALL_VETO
    assert hooks.static_veto(sys_close, features(), syscall_hooks=True) is None
    # Nothing else is vetoed for it.
    for hook, cands in hooks.HOOKS.items():
        for c in cands:
            if c.kind != "syscall":
                assert hooks.static_veto(c, features(kprobes=True), syscall_hooks=False) is None, (hook, c)


def test_settle_raises_for_required_and_explains_optional() -> None:
    ch = hooks.Choice("close", rejected=[("syscall", hooks.SYSCALL_VETO)])
    hooks.settle(ch, syscall_hooks=False)
    assert ch.reason.startswith("off: the application's close is its FIN")
    with pytest.raises(hooks.TracerError, match="cannot hook tcp_close"):
        hooks.settle(hooks.Choice("close", rejected=[("kprobe", "refused")]), syscall_hooks=True)
    with pytest.raises(hooks.TracerError, match="cannot hook inet_sock_set_state / tcp_set_state"):
        hooks.settle(hooks.Choice("state"), syscall_hooks=False)
    done = hooks.Choice("state", kind="tp_btf", programs=("state_tp_btf",))
    hooks.settle(done, syscall_hooks=False)
    assert done.reason == ""


def test_syscall_tax_lists_syscall_programs_only() -> None:
    choices = {
        "state": hooks.Choice("state", "tp_btf", ("state_tp_btf",)),
        "accept": hooks.Choice("accept", "syscall", ("accept4_sys_exit", "accept_sys_exit")),
        "close": hooks.Choice("close"),
    }
    assert hooks.syscall_tax(choices) == ["accept4_sys_exit", "accept_sys_exit"]


def test_bcc_has_no_btf_modes() -> None:
    for mode in hooks.BTF_MODES:
        with pytest.raises(hooks.TracerError, match="bcc backend has no"):
            hooks.check_attach_mode(mode, "bcc")
        hooks.check_attach_mode(mode, "core")
    with pytest.raises(hooks.TracerError, match="unknown attach mode"):
        hooks.check_attach_mode("uprobe", "core")


@pytest.mark.parametrize(("kinds", "version", "prealloc"), [
    (("tp_btf", "tp_btf"), (5, 10), False),  # BPF_PROG_TYPE_TRACING: never a "trace type"
    (("fentry", "fentry", "fentry"), (5, 15), False),
    (("tracepoint",), (5, 10), True),
    (("kprobe", "kprobe"), (6, 0), True),
    (("tp_btf", "syscall"), (5, 15), True),  # --syscall-hooks: classic tracepoints
    (("tracepoint",), (5, 4), True),  # no warning before 5.7, but as unsafe
    (("tracepoint", "kprobe"), (6, 1), False),  # bpf_mem_alloc
    (("kprobe", None), (6, 18), False),
])
def test_table_is_preallocated_only_for_trace_type_programs_before_6_1(
        kinds: tuple[str | None, ...], version: tuple[int, int], prealloc: bool) -> None:
    pairs = [(f"hook{i}", k) for i, k in enumerate(kinds)]
    why = hooks.table_prealloc_reason(pairs, version)
    assert (why is not None) is prealloc
    # The loaders pass a generator over their plan.
    assert hooks.table_prealloc_reason(iter(pairs), version) == why
    # A hook whose programs never touch the table does not count.
    assert hooks.table_prealloc_reason([(h, k) for h in hooks.TABLE_FREE_HOOKS for k in kinds], version) is None
    if why:
        assert "6.1" in why and all(k in why for k in set(kinds) & set(hooks.TRACE_TYPE_KINDS))


def test_every_kind_is_known_to_the_table_rule() -> None:
    """A new attach kind must be placed on one side of the rule: trace type
    (kprobe, tracepoint) or BPF_PROG_TYPE_TRACING."""
    kinds = {c.kind for cs in (*hooks.HOOKS.values(), *hooks.OPT_IN_HOOKS.values()) for c in cs}
    assert kinds <= set(hooks.TRACE_TYPE_KINDS) | set(hooks.BTF_MODES)
