"""TCP states, numbered as in include/net/tcp_states.h.

Names are the kernel's without the ``TCP_`` prefix, which is also how
``ss`` prints them (with dashes there: ``CLOSE-WAIT``).
"""

from __future__ import annotations

import enum


class TcpState(enum.IntEnum):
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13  # v6.9+: bound, not listening or connecting

    @classmethod
    def name_of(cls, value: int) -> str:
        try:
            return cls(value).name
        except ValueError:
            return f"STATE_{value}"

    @classmethod
    def from_ss(cls, text: str) -> TcpState:
        """Parse the state column of ``ss`` (``CLOSE-WAIT``, ``ESTAB``...)."""
        t = text.upper().replace("-", "_")
        aliases = {
            "ESTAB": "ESTABLISHED", "UNCONN": "CLOSE", "FIN_WAIT_1": "FIN_WAIT1", "FIN_WAIT_2": "FIN_WAIT2",
            "TIME_WAIT": "TIME_WAIT", "SYN_RECV": "SYN_RECV", "CLOSE_WAIT": "CLOSE_WAIT",
        }
        return cls[aliases.get(t, t)]


def state_mask(*states: TcpState) -> int:
    """A sock_diag idiag_states bitmask (1 << state)."""
    mask = 0
    for s in states:
        mask |= 1 << int(s)
    return mask
