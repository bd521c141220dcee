"""struct tcp_info, as a sock_diag reply's INET_DIAG_INFO attribute carries
it: its declaration, one socket's answer (:class:`TcpInfo`), and many
sockets' answers kept compactly (:class:`TcpInfoTable`).

The leak detectors judge a candidate socket by the kernel's
``last_data_recv`` / ``last_data_sent`` / ``last_ack_recv`` clocks (and its
rto, retransmits, probes and backoff), which only tcp_info gives.  The struct
is declared as data in pyroute2's notation (include/uapi/linux/tcp.h), and
its offsets are derived from that with C alignment, so there is one
description of it; tests/unit/inventory/test_sockdiag.py checks it field by
field against pyroute2's.  An older kernel's struct is shorter: a field past
its end is None, never read from whatever follows.

Pure: bytes in, numbers out.  Asking for tcp_info and finding it in a reply is
:mod:`pytracer.inventory.sockdiag` (the wire) and
:mod:`pytracer.inventory.session` (the lookups).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from pytracer.arrays import find_sorted, is_sorted
from pytracer.kernel.tcp_states import TcpState

# struct tcp_info (include/uapi/linux/tcp.h); the bitfield bytes
# (snd/rcv_wscale, delivery_rate_app_limited + fastopen_client_fail) as whole bytes.
TCP_INFO_FIELDS = (
    ("tcpi_state", "B"), ("tcpi_ca_state", "B"), ("tcpi_retransmits", "B"), ("tcpi_probes", "B"),
    ("tcpi_backoff", "B"), ("tcpi_options", "B"), ("tcpi_snd_wscale", "B"), ("tcpi_delivery_rate_app_limited", "B"),
    ("tcpi_rto", "I"), ("tcpi_ato", "I"), ("tcpi_snd_mss", "I"), ("tcpi_rcv_mss", "I"),
    ("tcpi_unacked", "I"), ("tcpi_sacked", "I"), ("tcpi_lost", "I"), ("tcpi_retrans", "I"), ("tcpi_fackets", "I"),
    ("tcpi_last_data_sent", "I"), ("tcpi_last_ack_sent", "I"), ("tcpi_last_data_recv", "I"),
    ("tcpi_last_ack_recv", "I"),
    ("tcpi_pmtu", "I"), ("tcpi_rcv_ssthresh", "I"), ("tcpi_rtt", "I"), ("tcpi_rttvar", "I"),
    ("tcpi_snd_ssthresh", "I"), ("tcpi_snd_cwnd", "I"), ("tcpi_advmss", "I"), ("tcpi_reordering", "I"),
    ("tcpi_rcv_rtt", "I"), ("tcpi_rcv_space", "I"), ("tcpi_total_retrans", "I"),
    ("tcpi_pacing_rate", "Q"), ("tcpi_max_pacing_rate", "Q"), ("tcpi_bytes_acked", "Q"),
    ("tcpi_bytes_received", "Q"), ("tcpi_segs_out", "I"), ("tcpi_segs_in", "I"), ("tcpi_notsent_bytes", "I"),
    ("tcpi_min_rtt", "I"), ("tcpi_data_segs_in", "I"), ("tcpi_data_segs_out", "I"), ("tcpi_delivery_rate", "Q"),
    ("tcpi_busy_time", "Q"), ("tcpi_rwnd_limited", "Q"), ("tcpi_sndbuf_limited", "Q"), ("tcpi_delivered", "I"),
    ("tcpi_delivered_ce", "I"), ("tcpi_bytes_sent", "Q"), ("tcpi_bytes_retrans", "Q"), ("tcpi_dsack_dups", "I"),
    ("tcpi_reord_seen", "I"), ("tcpi_rcv_ooopack", "I"), ("tcpi_snd_wnd", "I"),
)


def _c_offsets(fields: Iterable[tuple[str, str]]) -> dict[str, tuple[int, str]]:
    """name -> (offset, struct format) with C natural alignment."""
    out = {}
    off = 0
    for name, fmt in fields:
        size = struct.calcsize("=" + fmt.lstrip("<>=!"))
        off = (off + size - 1) // size * size
        out[name] = (off, "=" + fmt.lstrip("<>=!"))
        off += size
    return out


TCP_INFO_OFFSETS = _c_offsets(TCP_INFO_FIELDS)


@dataclass
class TcpInfo:
    """The parts of struct tcp_info the detectors use.  Times in milliseconds
    are "how long ago" (jiffies resolution)."""

    state: int
    retransmits: int
    probes: int
    backoff: int
    rto_us: int
    unacked: int
    last_data_sent_ms: int
    last_data_recv_ms: int
    last_ack_recv_ms: int
    rtt_us: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None

    @property
    def idle_ms(self) -> int:
        """No data either way for this long."""
        return min(self.last_data_sent_ms, self.last_data_recv_ms)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def decode_tcp_info(payload: bytes) -> TcpInfo | None:
    """struct tcp_info (include/uapi/linux/tcp.h) at the offsets
    :data:`TCP_INFO_FIELDS` declares; fields past the end of an older kernel's struct are None."""

    def get(name: str) -> int | None:
        off, fmt = TCP_INFO_OFFSETS[name]
        if off + struct.calcsize(fmt) > len(payload):
            return None
        return struct.unpack_from(fmt, payload, off)[0]

    need = ("tcpi_state", "tcpi_retransmits", "tcpi_probes", "tcpi_backoff", "tcpi_rto", "tcpi_unacked",
            "tcpi_last_data_sent", "tcpi_last_data_recv", "tcpi_last_ack_recv")
    vals = [get(n) for n in need]
    if any(v is None for v in vals):
        return None
    return TcpInfo(*vals, rtt_us=get("tcpi_rtt"), bytes_acked=get("tcpi_bytes_acked"),  # type: ignore[arg-type]
                   bytes_received=get("tcpi_bytes_received"))


# TcpInfo attribute -> struct tcp_info field; the last three are newer (None when absent).
_INFO_FIELDS = (
    ("state", "tcpi_state"), ("retransmits", "tcpi_retransmits"), ("probes", "tcpi_probes"),
    ("backoff", "tcpi_backoff"), ("rto_us", "tcpi_rto"), ("unacked", "tcpi_unacked"),
    ("last_data_sent_ms", "tcpi_last_data_sent"), ("last_data_recv_ms", "tcpi_last_data_recv"),
    ("last_ack_recv_ms", "tcpi_last_ack_recv"), ("rtt_us", "tcpi_rtt"), ("bytes_acked", "tcpi_bytes_acked"),
    ("bytes_received", "tcpi_bytes_received"),
)
_INFO_REQUIRED = 9  # the first nine: without them there is no answer


def _field_end(name: str) -> int:
    off, fmt = TCP_INFO_OFFSETS[name]
    return off + struct.calcsize(fmt)


_INFO_KEEP = max(_field_end(f) for _, f in _INFO_FIELDS)  # bytes of tcp_info kept per socket
_INFO_NEED = max(_field_end(f) for _, f in _INFO_FIELDS[:_INFO_REQUIRED])
_INFO_DTYPE = np.dtype({
    "names": [a for a, _ in _INFO_FIELDS],
    "formats": [TCP_INFO_OFFSETS[f][1] for _, f in _INFO_FIELDS],
    "offsets": [TCP_INFO_OFFSETS[f][0] for _, f in _INFO_FIELDS],
    "itemsize": _INFO_KEEP,
})


_U32 = struct.Struct("=I")
_SENT_AT, _RECV_AT = TCP_INFO_OFFSETS["tcpi_last_data_sent"][0], TCP_INFO_OFFSETS["tcpi_last_data_recv"][0]
_ESTABLISHED = int(TcpState.ESTABLISHED)


class TcpInfoTable(Mapping):
    """cookie -> :class:`TcpInfo`, for many sockets at once.

    A dump with tcp_info can answer for 100k sockets; one TcpInfo object
    each would cost ~30 MB.  This keeps the first bytes of each struct
    tcp_info in one buffer (under 150 bytes per socket), answers bulk
    questions with numpy (:meth:`idle_ms`), and builds a TcpInfo only for
    a socket that is looked up.

    With ``brief_below_ms``, an ESTABLISHED socket idle for less than that
    keeps only its idle time (12 bytes): a leak scan asks every ESTABLISHED
    candidate when it could be idle, and needs the rest of tcp_info only
    for the ones that are.  Such a socket is in :meth:`idle_ms` and
    :attr:`answered`, not in the mapping.
    """

    def __init__(self, brief_below_ms: int | None = None) -> None:
        self.brief_below_ms = brief_below_ms
        self._cookies = array("Q")
        self._raw = bytearray()
        self._lens = array("H")
        self._brief_cookies = array("Q")
        self._brief_idle = array("I")
        self._frozen: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._brief_frozen: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def answered(self) -> int:
        """Sockets answered for: in the mapping, or kept brief."""
        return len(self._cookies) + len(self._brief_cookies)

    def add(self, cookie: int, payload: bytes) -> bool:
        """Keep one socket's tcp_info; False (and nothing kept) when it is
        too short to hold the fields every answer needs."""
        if len(payload) < _INFO_NEED:
            return False
        if self.brief_below_ms is not None and payload[0] == _ESTABLISHED:
            idle = min(_U32.unpack_from(payload, _SENT_AT)[0], _U32.unpack_from(payload, _RECV_AT)[0])
            if idle < self.brief_below_ms:
                self._brief_frozen = None  # first: its views of the arrays would forbid the append
                self._brief_cookies.append(cookie)
                self._brief_idle.append(idle)
                return True
        n = min(len(payload), _INFO_KEEP)
        self._cookies.append(cookie)
        self._raw += payload[:n]
        if n < _INFO_KEEP:
            self._raw += bytes(_INFO_KEEP - n)
        self._lens.append(n)
        self._frozen = None
        return True

    def add_info(self, cookie: int, info: TcpInfo) -> None:
        rec = np.zeros(1, _INFO_DTYPE)
        for attr, _ in _INFO_FIELDS:
            v = getattr(info, attr)
            rec[attr] = 0 if v is None else v
        n = _INFO_KEEP if info.bytes_received is not None else _INFO_NEED
        self.add(cookie, rec.tobytes()[:n])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._frozen is None:
            cookies = np.frombuffer(self._cookies, np.uint64) if len(self._cookies) else np.zeros(0, np.uint64)
            rows = np.frombuffer(self._raw, _INFO_DTYPE) if self._raw else np.zeros(0, _INFO_DTYPE)
            lens = np.frombuffer(self._lens, np.uint16) if len(self._lens) else np.zeros(0, np.uint16)
            # The last answer for a cookie wins.
            order = np.argsort(cookies, kind="stable")[::-1]
            _, first = np.unique(cookies[order], return_index=True)
            keep = order[first]
            self._frozen = (cookies[keep], rows[keep], lens[keep])
        return self._frozen

    def _pos(self, cookies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = self._arrays()[0]
        return find_sorted(keys, np.asarray(cookies, dtype=np.uint64))

    def idle_ms(self, cookies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, ms without data either way) for each cookie."""
        cookies = np.asarray(cookies, dtype=np.uint64)
        pos, found = self._pos(cookies)
        rows = self._arrays()[1]
        idle = (np.minimum(rows["last_data_sent_ms"][pos], rows["last_data_recv_ms"][pos]).astype(np.int64)
                if len(rows) else np.zeros(len(found), np.int64))
        if len(self._brief_cookies):
            keys, brief_idle = self._brief_sorted()
            bpos, bhit = find_sorted(keys, cookies)
            bfound = ~found & bhit
            idle[bfound] = brief_idle[bpos[bfound]]
            found = found | bfound
        return found, idle

    def _brief_sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """The brief sockets' cookies, sorted, and their idle ms: sorted
        once for every :meth:`idle_ms` call until the next brief answer,
        in place (stable: the first answer for a cookie stays first), so
        the answers are held once, not also as a sorted copy."""
        if self._brief_frozen is None:
            keys = np.frombuffer(self._brief_cookies, np.uint64)
            idle = np.frombuffer(self._brief_idle, np.uint32)
            if not is_sorted(keys):
                order = np.argsort(keys, kind="stable")
                keys[:] = keys[order]
                idle[:] = idle[order]
                del order
            self._brief_frozen = (keys, idle)
        return self._brief_frozen

    def __getitem__(self, cookie: int) -> TcpInfo:
        if not isinstance(cookie, (int, np.integer)) or not 0 <= int(cookie) <= 0xFFFFFFFFFFFFFFFF:
            raise KeyError(cookie)
        pos, found = self._pos(np.array([int(cookie)], dtype=np.uint64))
        if not found[0]:
            raise KeyError(cookie)
        _, rows, lens = self._arrays()
        rec, n = rows[pos[0]], int(lens[pos[0]])
        vals = {a: (int(rec[a]) if i < _INFO_REQUIRED or _field_end(f) <= n else None)
                for i, (a, f) in enumerate(_INFO_FIELDS)}
        return TcpInfo(**vals)

    def __contains__(self, cookie: object) -> bool:
        try:
            self[cookie]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(self._arrays()[0].tolist())

    def __len__(self) -> int:
        return len(self._arrays()[0])
