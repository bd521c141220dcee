"""The ``tracer`` command line: a click group of thin commands.

Commands parse options, call the library, and render.  Library errors
become one line on stderr and a non-zero exit (see :func:`common.run`).
"""

from __future__ import annotations

import importlib

import click

from pytracer import __version__
from pytracer.cli.options import ATTACH_CHOICES, BACKEND_CHOICES, Context
from pytracer.kernel.environment import tune_malloc


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs, so `watch`
    does not pay for the exporter's HTTP stack (prometheus_client, ssl)."""

    commands_by_module = {"watch": "watch", "leaks": "leaks", "export": "export", "doctor": "doctor", "run": "run",
                          "destroy": "destroy"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.commands_by_module)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = self.commands_by_module.get(name)
        if module is None:
            return None
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--attach",
    type=click.Choice(ATTACH_CHOICES),
    envvar="PYTRACER_ATTACH",
    default="auto",
    show_default=True,
    help="Force one attach kind for every hook (no fallback).",
)
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    envvar="PYTRACER_BACKEND",
    default="auto",
    show_default=True,
    help="core: libbpf CO-RE object (needs BTF); bcc: compile at start (needs kernel headers).",
)
@click.option(
    "--syscall-hooks/--no-syscall-hooks",
    envvar="PYTRACER_SYSCALL_HOOKS",
    default=False,
    show_default=True,
    help="Allow syscall tracepoints where no other hook gives the fact (accept(2)'s fd, close(2) "
    "without a FIN). Off by default: while one is attached, every syscall of every process on "
    "the host takes the slow path.",
)
@click.version_option(__version__, prog_name="tracer")
@click.pass_context
def cli(ctx: click.Context, attach: str, backend: str, syscall_hooks: bool) -> None:
    """Trace the kernel's TCP socket lifecycle: lifetimes, stuck states, leaks.

    \b
    Examples:
      sudo tracer watch                 # the whole host, live
      sudo tracer watch --pid 1234      # sockets that pid accepted or connected
      sudo tracer watch --json --duration 10
      sudo tracer doctor                # kernel features and the hooks chosen
      sudo tracer run -- pytest tests/  # fail a test suite that leaks connections
    """
    tune_malloc()
    ctx.obj = Context(attach=attach, backend=backend, syscall_hooks=syscall_hooks)
