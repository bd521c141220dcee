"""Property tests of the CLI's values: every number option of every command
(thresholds, durations, intervals, sizes) and --pid, parsed by click as a
user's shell would hand them over.  A value is refused with a usage error,
or accepted as a finite number inside the option's range; never a traceback,
never NaN or infinity (which time.sleep() and the detectors cannot use)."""

from __future__ import annotations

import math
import os

import click
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pytracer.cli import cli
from pytracer.cli.options import validate_pids

pytestmark = pytest.mark.fuzz

COMMANDS = {name: cli.get_command(click.Context(cli), name) for name in ("watch", "leaks", "export", "doctor")}
NUMBER_OPTIONS = sorted(
    (name, p.opts[-1]) for name, cmd in COMMANDS.items() for p in cmd.params
    if isinstance(p, click.Option) and isinstance(p.type, (click.types._NumberRangeBase, click.types.IntParamType,
                                                             click.types.FloatParamType))
)

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "0x10", "1_0", "٣", "", " 1", "1e-400", "0"]),
    st.text(max_size=8),
)


def test_every_number_option_is_covered() -> None:
    names = {opt for _, opt in NUMBER_OPTIONS}
    assert {"--interval", "--duration", "--close-wait-after", "--idle-after", "--fd-warn-ratio", "--max-sockets",
            "--leak-interval", "--pid"} <= names


@given(st.sampled_from(NUMBER_OPTIONS), numbers)
@example(("watch", "--interval"), "nan")  # FloatRange(0.05, 3600) let NaN through: time.sleep(nan) raised
@example(("watch", "--duration"), "inf")
@example(("leaks", "--close-wait-after"), "nan")
@example(("export", "--fd-warn-ratio"), "nan")
def test_number_options(option: tuple[str, str], text: str) -> None:
    name, opt = option
    cmd = COMMANDS[name]
    try:
        ctx = cmd.make_context(name, [opt, text], resilient_parsing=False)
    except click.UsageError:
        return
    param = next(p for p in cmd.params if p.opts[-1] == opt)
    value = ctx.params[param.name]
    for v in value if isinstance(value, tuple) else (value,):
        assert isinstance(v, (int, float)) and math.isfinite(v)
        t = param.type
        if isinstance(t, click.types._NumberRangeBase):
            assert t.min is None or v >= t.min
            assert t.max is None or v <= t.max


@given(st.lists(st.integers(-(1 << 40), 1 << 40), max_size=3))
@example([os.getpid()])
@example([0])
def test_pids(pids: list[int]) -> None:
    try:
        got = validate_pids(pids)
    except click.BadParameter as exc:
        assert "\n" not in exc.format_message()
        return
    assert got == tuple(pids) and all(os.path.isdir(f"/proc/{p}") for p in got)
