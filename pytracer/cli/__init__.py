"""The ``tracer`` command line: a click group of thin commands.

Commands parse options, call the library, and render.  Library errors
become one line on stderr and a non-zero exit (see :func:`common.run`).
"""

from __future__ import annotations

import click

from .. import __version__
from .common import ATTACH_CHOICES, BACKEND_CHOICES, Context


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@click.version_option(__version__, prog_name="tracer")
@click.pass_context
def cli(ctx: click.Context, attach: str, backend: str) -> None:
    """Trace the kernel's TCP socket lifecycle: lifetimes, stuck states, leaks.

    \b
    Examples:
      sudo tracer watch                 # the whole host, live
      sudo tracer watch --pid 1234      # sockets that pid accepted or connected
      sudo tracer watch --json --duration 10
      sudo tracer doctor                # kernel features and the hooks chosen
    """
    ctx.obj = Context(attach=attach, backend=backend)


def _register() -> None:
    from . import doctor, watch

    cli.add_command(watch.watch)
    cli.add_command(doctor.doctor)
    for mod in ("leaks", "export"):
        try:
            module = __import__(f"{__name__}.{mod}", fromlist=[mod])
        except ImportError:
            continue
        cli.add_command(getattr(module, mod))


_register()
