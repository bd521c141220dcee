"""The command ``tracer run`` gates: started held, released once traced.

:class:`HeldCommand` forks a child that waits on a pipe before it runs any
of the command's code.  The caller puts the child's pid into the kernel's
pid filter and attaches, then :meth:`HeldCommand.release` lets it drop to
the target user and exec the command, so nothing the command does happens
before the tracer sees it.  Closing the pipe without releasing (the tracer
failed to attach) makes the child exit 127 without exec'ing anything.

Signals: the caller blocks SIGINT, SIGTERM and SIGCHLD before the fork
(:func:`blocked_signals`) and waits for them with :func:`next_signal`; the
child restores the default dispositions and an empty mask before exec.  A
signal some process sent (``kill``, a CI runner) is forwarded to the
command; one the terminal generated (Ctrl-C: ``si_code`` SI_KERNEL) has
reached the command already, since it shares our process group, and is not
sent twice.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
from dataclasses import dataclass
from typing import Sequence

__all__ = ["CommandError", "HeldCommand", "RunAs", "blocked_signals", "exit_code", "next_signal", "resolve_user"]

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
WAITED = frozenset({*FORWARDED, signal.SIGCHLD})
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
SI_KERNEL = 0x80  # include/uapi/asm-generic/siginfo.h: sent by the kernel (the tty's Ctrl-C)
EXEC_FAILED = 127


class CommandError(RuntimeError):
    """The command cannot be started as asked; one line for the user."""


@dataclass(frozen=True)
class RunAs:
    """Who the command runs as."""

    name: str
    uid: int
    gid: int
    home: str
    why: str  # "--user", "SUDO_USER" or "invoker"


def resolve_user(user: str | None, environ: dict[str, str] | None = None) -> RunAs:
    """``--user`` if given, else SUDO_USER when set, else whoever runs us."""
    env = os.environ if environ is None else environ
    name, why = (user, "--user") if user else (env.get("SUDO_USER") or None, "SUDO_USER")
    if not name:
        pw = pwd.getpwuid(os.getuid())
        return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "invoker")
    try:
        pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise CommandError(f"no such user {name!r} ({why})") from None
    if os.getuid() != 0 and pw.pw_uid != os.getuid():
        raise CommandError(f"running the command as {pw.pw_name} ({why}) needs root")
    return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, why)


def find_program(argv: Sequence[str], env: dict[str, str]) -> str:
    """The path exec will run, or :class:`CommandError` (checked before any tracing starts)."""
    if not argv:
        raise CommandError("no command given: tracer run [OPTIONS] -- CMD [ARGS...]")
    prog = argv[0]
    found = shutil.which(prog, path=env.get("PATH", os.defpath)) if "/" not in prog else (
        prog if os.path.isfile(prog) and os.access(prog, os.X_OK) else None)
    if not found:
        raise CommandError(f"command not found or not executable: {prog}")
    return found


def blocked_signals() -> set[signal.Signals]:
    """Block the signals the run loop waits for; returns the previous mask."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)


class HeldCommand:
    """A forked child holding the command until :meth:`release`.  Fork it
    before any thread starts (the child only reads a pipe, changes user and
    execs)."""

    def __init__(self, argv: Sequence[str], run_as: RunAs, old_mask: set[signal.Signals]) -> None:
        self.argv = list(argv)
        self.run_as = run_as
        env = dict(os.environ)
        if run_as.why != "invoker":
            env.update(HOME=run_as.home, USER=run_as.name, LOGNAME=run_as.name)
        self.env = env
        self.program = find_program(self.argv, env)
        self.status: int | None = None
        self.parent = os.getpid()
        go_r, self._go = os.pipe()
        self._err_r, err_w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child: never returns
            os.close(self._go)
            os.close(self._err_r)
            self._child(go_r, err_w, old_mask)
        os.close(go_r)
        os.close(err_w)

    def _child(self, go_r: int, err_w: int, old_mask: set[signal.Signals]) -> None:  # pragma: no cover
        code = EXEC_FAILED
        try:
            if os.read(go_r, 1) != b"g":
                os._exit(EXEC_FAILED)  # the tracer gave up: never run the command untraced
            os.close(go_r)
            for sig in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask - WAITED)
            ra = self.run_as
            if ra.why != "invoker" and (os.getuid() != ra.uid or os.getgid() != ra.gid):
                os.initgroups(ra.name, ra.gid)
                os.setgid(ra.gid)
                os.setuid(ra.uid)
            # Killed with the tracer (even by SIGKILL) rather than left to run
            # untraced.  Set after setuid(), which clears it.
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != self.parent:
                os._exit(EXEC_FAILED)
            os.execve(self.program, self.argv, self.env)
        except BaseException as exc:  # noqa: BLE001 - report anything, then exit
            try:
                os.write(err_w, f"{type(exc).__name__}: {exc}".encode()[:500])
            finally:
                os._exit(code)

    def release(self) -> None:
        """Let the command run; raises :class:`CommandError` if exec failed."""
        os.write(self._go, b"g")
        os.close(self._go)
        self._go = -1
        msg = os.read(self._err_r, 600)  # EOF when exec succeeded (the pipe is close-on-exec)
        os.close(self._err_r)
        self._err_r = -1
        if msg:
            raise CommandError(f"could not start {self.argv[0]}: {msg.decode(errors='replace')}")

    def abandon(self) -> None:
        """The tracer could not attach: the child exits without exec."""
        for fd in (self._go, self._err_r):
            if fd >= 0:
                os.close(fd)
        self._go = self._err_r = -1
        if self.status is None:
            os.waitpid(self.pid, 0)
            self.status = -1

    def poll(self) -> int | None:
        """The command's wait status once it exited (reaped here), else None."""
        if self.status is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.status = st
        return self.status

    def forward(self, sig: int) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def next_signal(timeout: float) -> signal.struct_siginfo | None:  # type: ignore[name-defined]
    """The next of the blocked signals, or None after ``timeout`` seconds."""
    return signal.sigtimedwait(WAITED, max(timeout, 0.0))


def should_forward(info: signal.struct_siginfo) -> bool:  # type: ignore[name-defined]
    """Forward a signal unless the terminal sent it to our whole process group."""
    return info.si_signo != signal.SIGCHLD and info.si_code != SI_KERNEL


def exit_code(wait_status: int) -> int:
    """A shell's view of a wait status: the exit code, or 128 + the signal."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code
