"""Python mirrors of bpf/pytracer.h, the ABI shared with the kernel side.

Each struct is declared once with ctypes; numpy views of map dumps are
derived from the same declarations (``np.dtype(PtSock)``), so there is no
second description to drift.  tests/unit/kernel/test_abi.py checks sizes and
offsets against the BTF inside the shipped object.
"""

from __future__ import annotations

import ctypes
import enum

PT_STATES = 16
PT_HISTORY = 16
PT_HIST_SLOTS = 160
PT_HIST_LIFETIME = 0
PT_HIST_STATE = 4
PT_HISTS = PT_HIST_STATE + PT_STATES
PT_AGG_ENTRIES = 2  # agg[0]: outermost runs, agg[1]: nested runs (pytracer.h)


class Direction(enum.IntEnum):
    ACTIVE = 0
    PASSIVE = 1
    LISTEN = 2
    UNKNOWN = 3


PT_DIRS = 4

# pt_sock.flags
PT_F_BIRTH_UNKNOWN = 1 << 0
PT_F_PEER_FIN = 1 << 1
PT_F_RESET = 1 << 2
PT_F_SEEDED = 1 << 3


class Stat(enum.IntEnum):
    OPENED = 0  # + direction
    CLOSED = 4  # + direction
    ENTERED = 8  # + state
    LEFT = 24  # + state
    INSERT_FAILED = 40
    FILTER_SKIPPED = 41
    MIDLIFE = 42
    ACCEPT_UNTRACKED = 43
    APP_CLOSE = 44
    DESTROYED = 45
    FILTER_FULL = 46
    LISTENER_FAILED = 47


PT_STATS = 48


class PtSock(ctypes.Structure):
    _fields_ = [
        ("birth_ns", ctypes.c_uint64),
        ("state_ns", ctypes.c_uint64),
        ("close_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("ino", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint32),
        ("owner_tgid", ctypes.c_uint32),
        ("closer_tgid", ctypes.c_uint32),
        ("owner_fd", ctypes.c_int32),
        ("listener_tgid", ctypes.c_uint32),
        ("peer_fin_t", ctypes.c_uint32),  # units of 2**20 ns, wraps
        ("transitions", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("counted", ctypes.c_uint8),
        ("accepted", ctypes.c_uint8),
        ("app_closed", ctypes.c_uint8),
        ("family", ctypes.c_uint16),
        ("lport", ctypes.c_uint16),
        ("rport", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("laddr", ctypes.c_uint8 * 16),
        ("raddr", ctypes.c_uint8 * 16),
        ("owner_comm", ctypes.c_char * 16),
        ("history", ctypes.c_uint8 * PT_HISTORY),
    ]


class PtListenKey(ctypes.Structure):
    _fields_ = [("netns_ino", ctypes.c_uint32), ("port", ctypes.c_uint16), ("family", ctypes.c_uint16)]


class PtHist(ctypes.Structure):
    _fields_ = [("slots", ctypes.c_uint64 * PT_HIST_SLOTS), ("sum_us", ctypes.c_uint64)]


class PtAgg(ctypes.Structure):
    _fields_ = [
        ("stats", ctypes.c_uint64 * PT_STATS),
        ("transitions", (ctypes.c_uint64 * PT_STATES) * PT_STATES),
        ("hists", PtHist * PT_HISTS),
    ]


class PtConfig(ctypes.Structure):
    _fields_ = [
        ("filter_owner", ctypes.c_uint8),
        ("key_by_ptr", ctypes.c_uint8),
        ("hz", ctypes.c_uint16),
        ("nursery_bits", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


# --- idle before end, per service (pytracer.h: pt_svc) ---------------------


class Ender(enum.IntEnum):
    """Who ended a connection (pt_svc.idle index)."""

    LOCAL = 0  # the local application closed first (FIN)
    PEER = 1  # the peer's FIN came first
    RESET = 2  # a RST was received
    ABORT = 3  # the local side aborted: sent a RST
    TIMEOUT = 4  # keepalive or retransmission timeout


PT_ENDERS = 5
PT_SVC_SLOTS = 16  # slot 0: "other"


class Role(enum.IntEnum):
    """Which port names a service: the listener's, or the peer's."""

    SERVER = 0
    CLIENT = 1


class PtSvcKey(ctypes.Structure):
    _fields_ = [("port", ctypes.c_uint16), ("role", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class PtSvc(ctypes.Structure):
    _fields_ = [
        ("ends", ctypes.c_uint64),
        ("no_idle", ctypes.c_uint64),
        ("owner", ctypes.c_uint32 * (PT_ENDERS + 1)),
        ("lifetime", PtHist),
        ("idle", PtHist * PT_ENDERS),
    ]


class PtTree(ctypes.Structure):
    """The "tree" map's value: counts of `tracer run`'s process-tree following."""

    _fields_ = [("followed", ctypes.c_uint64), ("exited", ctypes.c_uint64), ("full", ctypes.c_uint64)]


def percpu_stride(value_size: int) -> int:
    """Per-CPU values are laid out every round_up(value_size, 8) bytes."""
    return (value_size + 7) & ~7
