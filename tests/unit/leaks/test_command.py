"""pytracer.leaks.command: who the command runs as, finding it, exit codes, which signals are forwarded."""

import os
import pwd
import signal
from types import SimpleNamespace

import pytest

from pytracer.leaks.command import SI_KERNEL, CommandError, exit_code, find_program, resolve_user, should_forward


def test_user_is_the_option_then_sudo_user_then_the_invoker() -> None:
    me = pwd.getpwuid(os.getuid())
    assert resolve_user(None, {}).name == me.pw_name and resolve_user(None, {}).why == "invoker"
    assert resolve_user(None, {"SUDO_USER": me.pw_name}).why == "SUDO_USER"
    assert resolve_user(me.pw_name, {"SUDO_USER": "nobody-else"}).why == "--user"
    assert resolve_user(str(me.pw_uid), {}).name == me.pw_name
    with pytest.raises(CommandError, match="no such user 'no-such-user-pt' \\(SUDO_USER\\)"):
        resolve_user(None, {"SUDO_USER": "no-such-user-pt"})


def test_program_is_found_on_path_or_refused() -> None:
    assert find_program(["sh", "-c", "true"], {"PATH": "/bin:/usr/bin"}).endswith("/sh")
    with pytest.raises(CommandError, match="command not found"):
        find_program(["no-such-cmd-pt"], {"PATH": "/bin"})
    with pytest.raises(CommandError, match="no command"):
        find_program([], {})


def test_exit_code_is_the_shells() -> None:
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3
    assert exit_code(int(signal.SIGTERM)) == 128 + signal.SIGTERM


def test_terminal_signals_are_not_sent_twice() -> None:
    assert should_forward(SimpleNamespace(si_signo=signal.SIGINT, si_code=0))  # kill(1)
    assert not should_forward(SimpleNamespace(si_signo=signal.SIGINT, si_code=SI_KERNEL))  # Ctrl-C
    assert not should_forward(SimpleNamespace(si_signo=signal.SIGCHLD, si_code=1))
