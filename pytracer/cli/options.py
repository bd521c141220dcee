"""Shared CLI plumbing: the options every command shares (pids, table size,
leak thresholds), error mapping, signals, pid validation."""

from __future__ import annotations

import functools
import importlib
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import click

from pytracer.kernel.core import DEFAULT_MAX_SOCKETS, Tracer
from pytracer.kernel.environment import EnvironmentProblem
from pytracer.kernel.hooks import ATTACH_MODES, TracerError
from pytracer.kernel.libbpf import LibbpfError, LibbpfMissing
from pytracer.leaks.thresholds import Thresholds

ATTACH_CHOICES = ATTACH_MODES
BACKEND_CHOICES = ("auto", "core", "bcc")


@dataclass
class Context:
    attach: str = "auto"
    backend: str = "auto"
    syscall_hooks: bool = False


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like Ctrl-C so everything is detached.

    A BaseException, like KeyboardInterrupt: best-effort code that catches
    Exception (the leak scan, seeding) must not swallow it."""


# The exception a stop signal raised, kept: Python drops an exception raised
# where it ignores exceptions (a weakref callback, __del__: "Exception ignored
# in ..."), so a signal landing there would be lost.  Long-running loops call
# check_stop() each turn.
_stopping: type[BaseException] | None = None


def _on_stop_signal(signum: int, frame: Any) -> None:
    """SIGTERM raises Terminated, SIGINT KeyboardInterrupt, each kept."""
    global _stopping
    _stopping = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    raise _stopping()


def check_stop() -> None:
    """Raise again the stop signal (SIGTERM, SIGINT) whose own raise was lost."""
    if _stopping is not None:
        raise _stopping()


def run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _on_stop_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_stop_signal)
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


EXIT_ERROR = 2


def exit_codes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors exit 2, so that 1 can mean "something is flagged" (leaks, run)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException as exc:
            exc.exit_code = EXIT_ERROR
            raise

    return wrapper


class FiniteRange(click.FloatRange):
    """click.FloatRange without NaN and infinity, which its bounds let through
    (every comparison with NaN is false) and time.sleep() refuses."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def validate_pids(pids: Iterable[int]) -> tuple[int, ...]:
    from pytracer.inventory import procs  # noqa: PLC0415 - numpy: loaded in the background otherwise

    out = []
    for pid in pids:
        if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
            raise click.BadParameter(f"no process with pid {pid}", param_hint="--pid")
        # A thread id is not a process: the kernel records tgids.
        tgid = procs.tgid(pid) or pid
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


def service_ports_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--service-ports",
        default="auto",
        show_default=True,
        metavar="LIST",
        help="Services with their own lifetime and idle-before-end histograms: PORT, server:PORT, client:PORT "
        "or auto (the host's listening ports, then its most used remote ports), comma-separated, at most 15; "
        "the rest fold into service=\"other\".",
    )(f)


def services_from(kw: dict[str, Any]) -> tuple[dict[Any, int], bool]:
    """Pop --service-ports from ``kw``: the kernel slots of the services, and
    whether ports found while running may take the free ones (auto)."""
    from pytracer.inventory import services  # noqa: PLC0415 - discovery pulls numpy
    from pytracer.kernel.environment import require_privileges  # noqa: PLC0415

    require_privileges()  # before discovery, whose own warnings would come first
    try:
        spec = services.parse(kw.pop("service_ports", None))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--service-ports") from None
    found = services.discover() if spec.auto else []
    return services.assign(spec, found), spec.auto


def make_tracer(ctx: Context, pids: Iterable[int] = (), max_sockets: int = DEFAULT_MAX_SOCKETS,
                services: tuple[dict[Any, int], bool] | None = None, follow_forks: bool = False) -> Tracer:
    """``services``: what services_from() returns."""
    slots, auto = services or ({}, False)
    backend = ctx.backend
    if backend == "bcc":
        from pytracer.kernel.bcc import BccTracer  # noqa: PLC0415 - optional backend

        return BccTracer(  # type: ignore[return-value]
            max_sockets=max_sockets, pids=pids, attach=ctx.attach, syscall_hooks=ctx.syscall_hooks,
            services=slots, services_auto=auto, follow_forks=follow_forks,
        )
    if backend == "auto" and not os.path.exists("/sys/kernel/btf/vmlinux"):
        from pytracer.kernel.bcc import BccTracer  # noqa: PLC0415

        # bcc itself is imported at open(), which says in one line what is missing.
        return BccTracer(  # type: ignore[return-value]
            max_sockets=max_sockets, pids=pids, attach=ctx.attach, syscall_hooks=ctx.syscall_hooks,
            reason="auto: this kernel has no BTF (/sys/kernel/btf/vmlinux) for the CO-RE backend",
            services=slots, services_auto=auto, follow_forks=follow_forks,
        )
    return Tracer(max_sockets=max_sockets, pids=pids, attach=ctx.attach, syscall_hooks=ctx.syscall_hooks,
                  services=slots, services_auto=auto, follow_forks=follow_forks)


def _threshold_opts(sockets_only: bool) -> list[Callable[..., Any]]:
    d = Thresholds()
    secs = FiniteRange(0, None)
    ratio = FiniteRange(0, 1, min_open=True)
    opts = [
        click.option("--close-wait-after", type=secs, default=d.close_wait_after, show_default=True, metavar="S",
                     help="Flag sockets in CLOSE_WAIT longer than S seconds."),
        click.option("--idle-after", type=secs, default=d.idle_after, show_default=True, metavar="S",
                     help="Flag ESTABLISHED sockets with no data either way for S seconds."),
        click.option("--last-ack-after", type=secs, default=d.last_ack_after, show_default=True, metavar="S",
                     help="Flag sockets stuck in LAST_ACK longer than S seconds."),
        click.option("--fin-wait2-after", type=secs, default=None, metavar="S",
                     help="Flag FIN_WAIT2 sockets older than S seconds [default: net.ipv4.tcp_fin_timeout]."),
    ]
    if sockets_only:
        return opts
    return opts + [
        click.option("--fd-warn-ratio", type=ratio, default=d.fd_warn_ratio, show_default=True, metavar="R",
                     help="Flag processes using this fraction of RLIMIT_NOFILE."),
        click.option("--time-wait-warn-ratio", type=ratio, default=d.time_wait_warn_ratio, show_default=True,
                     metavar="R", help="Flag destinations whose TIME_WAIT sockets use this fraction of the "
                     "ephemeral port range."),
        click.option("--growth-polls", type=click.IntRange(1, 100), default=d.growth_polls, show_default=True,
                     metavar="N", help="Flag CLOSE_WAIT growth after N polls without a decrease..."),
        click.option("--growth-min", type=click.IntRange(1, None), default=d.growth_min, show_default=True,
                     metavar="N", help="...and a rise of at least N sockets."),
    ]


def threshold_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The detectors' thresholds as options: ``watch``, ``leaks`` and ``export`` take the same set."""
    for o in reversed(_threshold_opts(False)):
        f = o(f)
    return f


def socket_threshold_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The thresholds of the per-socket detectors only (``destroy``): the same options, names and defaults."""
    for o in reversed(_threshold_opts(True)):
        f = o(f)
    return f


THRESHOLD_KEYS = ("close_wait_after", "idle_after", "last_ack_after", "fin_wait2_after", "fd_warn_ratio",
                  "time_wait_warn_ratio", "growth_polls", "growth_min")


def thresholds_from(kw: dict[str, Any], top: int | None = None) -> Thresholds:
    th = Thresholds(**{k: kw.pop(k) for k in THRESHOLD_KEYS if k in kw})
    if top is not None:
        th.top = top
    try:
        th.validate()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return th


def preload_leaks() -> threading.Thread:
    """Import the leak layer (numpy and the sock_diag parser: 0.18-0.23 s here) in the background
    while the BPF programs load and attach; ``import`` waits for it after."""
    def load() -> None:
        for name in ("pytracer.inventory.seed", "pytracer.leaks.scanner"):
            importlib.import_module(name)

    t = threading.Thread(target=load, name="pytracer-preload", daemon=True)
    t.start()
    return t
