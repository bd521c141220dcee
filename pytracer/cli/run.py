"""``tracer run -- CMD``: run a command (a test suite) and fail it on leaked connections.

Order, so the command never runs half-traced: check the input, fork the
command held on a pipe (:class:`pytracer.leaks.command.HeldCommand`),
load and attach with only its pid in the kernel's filter and the fork hook
on, then release it.  Any failure before the release ends the held child
without exec.  Exit: the command's code if it failed, else 1 when a
``--fail-on`` kind was flagged, else 0; 2 for bad input or environment.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import click

from pytracer.cli.options import (
    Context,
    exit_codes,
    make_tracer,
    max_sockets_option,
    preload_leaks,
    threshold_options,
    thresholds_from,
)
from pytracer.cli.options import run as library_errors
from pytracer.leaks.command import (
    CommandError,
    HeldCommand,
    blocked_signals,
    exit_code,
    next_signal,
    resolve_user,
    should_forward,
)
from pytracer.leaks.gate import DEFAULT_FAIL_ON, parse_kinds


@click.command(context_settings={"ignore_unknown_options": False})
@threshold_options
@click.option("--fail-on", "fail_on", default=",".join(DEFAULT_FAIL_ON), show_default=True, metavar="KINDS",
              help="Flag kinds that fail the run (comma-separated; 'all' or 'none').")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the run's findings as JSON to this file.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write a JUnit XML file, one test case per flag kind.")
@click.option("--user", default=None, metavar="U",
              help="Run the command as this user [default: $SUDO_USER, else the invoker].")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between leak scans while the command runs.")
@max_sockets_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
@exit_codes
def run(obj: Context, command: tuple[str, ...], fail_on: str, report_path: str | None, junit_path: str | None,
        user: str | None, interval: float, max_sockets: int, **kw: Any) -> None:
    """Run CMD, follow its whole process tree, and fail on leaked connections.

    Flags print on stderr as they appear; when CMD exits, a summary
    (connections opened and closed by the tree, lifetimes, every flag, the
    sockets of processes that outlived CMD) goes to stdout.  Exit: CMD's
    code if it failed, else 1 when a --fail-on kind was flagged, else 0;
    2 for bad input or a tracer that cannot attach (CMD is then never run).

    \b
    Examples:
      sudo tracer run -- pytest -x tests/
      sudo tracer run --close-wait-after 5 --junit leaks.xml -- make test
      sudo tracer run --fail-on all --report run.json --user ci -- ./integration.sh
    """
    try:
        kinds = parse_kinds(fail_on)
    except ValueError as exc:
        raise click.ClickException(f"--fail-on: {exc}") from None
    thresholds = thresholds_from(kw)
    for opt, path in (("--report", report_path), ("--junit", junit_path)):
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if path and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise click.ClickException(f"{opt}: cannot write {path} (no such directory, or not writable)")
    try:
        run_as = resolve_user(user)
    except CommandError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(_run(obj, list(command), run_as, kinds, thresholds, interval, max_sockets, report_path, junit_path))


@library_errors
def _run(obj: Context, argv: list[str], run_as: Any, kinds: tuple[str, ...], thresholds: Any, interval: float,
         max_sockets: int, report_path: str | None, junit_path: str | None) -> int:
    old_mask = blocked_signals()
    try:
        held = HeldCommand(argv, run_as, old_mask)  # before any thread: the child only execs
    except CommandError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise click.ClickException(str(exc)) from None
    released = False
    try:
        preload_leaks()  # a thread: only now, after the fork
        tracer = make_tracer(obj, (held.pid,), max_sockets, follow_forks=True)
        with tracer:
            from pytracer.leaks.gate import Gate
            from pytracer.views.leaks import flag_lines
            from pytracer.views.run import junit_xml, report_json, summary_text

            gate = Gate(tracer, thresholds)
            gate.warm()
            hooks = " ".join(f"{h}={c.kind}" for h, c in tracer.choices.items() if c.kind)
            click.echo(f"tracer: attached ({hooks}); running {argv[0]} as {run_as.name} (pid {held.pid})", err=True)
            try:
                held.release()
            except CommandError as exc:
                raise click.ClickException(str(exc)) from None
            released = True
            status = _wait(held, gate, interval, flag_lines)
            result = gate.finish(argv, run_as.name, exit_code(status), kinds)
        click.echo(summary_text(result))
        if report_path:
            with open(report_path, "w") as f:
                json.dump(report_json(result), f, indent=1)
        if junit_path:
            with open(junit_path, "wb") as f:
                f.write(junit_xml(result))
        return result.verdict
    finally:
        if not released:
            held.abandon()
        # The signals stay blocked until we exit: one that came after the
        # command ended must not turn the verdict into an interruption.


def _wait(held: HeldCommand, gate: Any, interval: float, flag_lines: Any) -> int:
    """Until the command exits: forward signals, print new flags on stderr."""
    next_scan = time.monotonic() + interval
    while True:
        status = held.poll()
        if status is not None:
            return status
        info = next_signal(next_scan - time.monotonic())
        if info is not None:
            if should_forward(info):
                held.forward(info.si_signo)
            continue
        next_scan = time.monotonic() + interval
        new = gate.tick()
        if new:
            click.echo("\n".join(["tracer: flagged:", *flag_lines(new)]), err=True)
