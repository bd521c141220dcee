"""Shared CLI plumbing: options, error mapping, signals, pid validation."""

from __future__ import annotations

import functools
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import click

from pytracer.kernel.core import ATTACH_MODES, DEFAULT_MAX_SOCKETS, Tracer, TracerError
from pytracer.kernel.environment import EnvironmentProblem
from pytracer.kernel.libbpf import LibbpfError, LibbpfMissing

ATTACH_CHOICES = ATTACH_MODES
BACKEND_CHOICES = ("auto", "core", "bcc")


@dataclass
class Context:
    attach: str = "auto"
    backend: str = "auto"


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like Ctrl-C so everything is detached.

    A BaseException, like KeyboardInterrupt: best-effort code that catches
    Exception (the leak scan, seeding) must not swallow it."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, Terminated):
            sys.exit(0)
        except BrokenPipeError:
            # stdout went away (e.g. `| head`): exit quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except (TracerError, EnvironmentProblem, LibbpfMissing) as exc:
            raise click.ClickException(str(exc)) from None
        except LibbpfError as exc:
            raise click.ClickException(f"{exc.strerror if exc.what is None else exc}") from None

    return wrapper


def validate_pids(pids: Iterable[int]) -> tuple[int, ...]:
    out = []
    for pid in pids:
        if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
            raise click.BadParameter(f"no process with pid {pid}", param_hint="--pid")
        # A thread id is not a process: the kernel records tgids.
        try:
            with open(f"/proc/{pid}/status") as f:
                tgid = next((int(line.split()[1]) for line in f if line.startswith("Tgid:")), pid)
        except OSError:
            tgid = pid
        if tgid != pid:
            raise click.BadParameter(f"{pid} is a thread of process {tgid}: pass {tgid}", param_hint="--pid")
        out.append(pid)
    return tuple(out)


def pid_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--pid",
        "pids",
        type=int,
        multiple=True,
        metavar="PID",
        help="Only sockets these processes accepted or connected (repeatable).",
    )(f)


def max_sockets_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--max-sockets",
        type=click.IntRange(1024, 1 << 24),
        default=DEFAULT_MAX_SOCKETS,
        show_default=True,
        help="Capacity of the kernel's socket table; a full table is counted, never silent.",
    )(f)


def make_tracer(ctx: Context, pids: Iterable[int] = (), max_sockets: int = DEFAULT_MAX_SOCKETS) -> Tracer:
    backend = ctx.backend
    if backend == "bcc":
        from pytracer.kernel.bcc import BccTracer  # noqa: PLC0415 - optional backend

        return BccTracer(max_sockets=max_sockets, pids=pids, attach=ctx.attach)  # type: ignore[return-value]
    if backend == "auto" and not os.path.exists("/sys/kernel/btf/vmlinux"):
        from pytracer.kernel.bcc import BccTracer  # noqa: PLC0415

        # bcc itself is imported at open(), which says in one line what is missing.
        return BccTracer(  # type: ignore[return-value]
            max_sockets=max_sockets, pids=pids, attach=ctx.attach,
            reason="auto: this kernel has no BTF (/sys/kernel/btf/vmlinux) for the CO-RE backend",
        )
    return Tracer(max_sockets=max_sockets, pids=pids, attach=ctx.attach)
