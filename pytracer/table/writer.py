"""The one writer of the tracer's kernel maps from user space.

The kernel owns the socket table: its programs create, update and delete the
records.  User space writes into the tracer's maps in four cases only, all
here, so the rules about not clobbering the kernel's own records live in one
place:

* seeding (:func:`write_seeded`): records for sockets older than the tracer,
  marked "birth unknown", never overwriting one the kernel made;
* the "listeners" map (:func:`add_listener`): who listens on a port, for
  listeners that predate the tracer, so their accepted children are
  attributed (and kept under --pid);
* the "owners" pid filter (:func:`fill_pid_filter`, :func:`add_pids`);
* the "svc_ports" service names (:func:`fill_services`);
* reaping (:func:`reap`): deleting a record whose socket is gone without a
  transition to CLOSE (the leak scanner decides which; this checks the record did
  not change since and deletes it).

What to seed is gathered elsewhere (:mod:`pytracer.inventory.seed`: sock_diag
and the fd owners); this module takes arrays and a tracer (anything with
``map(name)``).  BPF map flags are from include/uapi/linux/bpf.h.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np

from pytracer.arrays import among, find_sorted
from pytracer.kernel import abi
from pytracer.kernel.libbpf import LibbpfError
from pytracer.kernel.tcp_states import TcpState
from pytracer.table import poll, reads
from pytracer.table.reads import SOCK_DTYPE

S = TcpState
BPF_NOEXIST = 1  # include/uapi/linux/bpf.h
BPF_EXIST = 2
# States a seeded record can be in: full sockets the BPF side will see
# transition, and end at CLOSE.  TIME_WAIT and request sockets are
# minisockets (no state transitions of their own), and so are FIN_WAIT2
# orphans in timewait: seeding them would leave records nobody deletes.
SEED_STATES = (S.ESTABLISHED, S.SYN_SENT, S.SYN_RECV, S.FIN_WAIT1, S.FIN_WAIT2, S.CLOSE_WAIT, S.LAST_ACK, S.LISTEN,
               S.CLOSING)
# Seeded records built and written per batch: ~1.2 MB of whole records at a time.
SEED_CHUNK = 8192


class Redump(Protocol):
    """What :func:`write_seeded` asks again after inserting (a sock_diag Session)."""

    def dump(self, *, states: int, fields: tuple[str, ...] | None = None) -> Any: ...

    def cookies(self, *, states: int) -> np.ndarray: ...


@dataclass
class SeedResult:
    """What :func:`pytracer.inventory.seed.seed` put into the kernel's table."""

    seeded: int = 0  # records inserted
    existed: int = 0  # the kernel had a record already (it wins)
    failed: int = 0  # could not insert: table full or out of memory
    vanished: int = 0  # destroyed while we seeded; their records removed again
    repaired: int = 0  # changed state while we seeded; records rewritten from a fresh dump
    midlife_during: int = 0  # kernel mid-life records made while we inserted (-1: unknown)
    skipped: str | None = None  # why nothing was seeded
    by_state: dict[str, int] = field(default_factory=dict)
    with_owner: int = 0
    listeners: int = 0  # listening sockets' owners put into the "listeners" map
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if self.skipped:
            return f"pre-existing sockets not seeded: {self.skipped}; {self.listeners} listeners' owners recorded"
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.by_state.items())) or "none"
        text = (f"seeded {self.seeded} pre-existing sockets ({states}; {self.with_owner} with an owning process), "
                f"{self.existed} already tracked")
        if self.errors:
            text += "; problems: " + "; ".join(self.errors[:3])
        if self.failed:
            text += f", {self.failed} NOT inserted (socket table full: raise --max-sockets)"
        if self.vanished:
            text += f", {self.vanished} closed while seeding"
        return text

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _is_full(err: int) -> bool:
    return err in (errno.E2BIG, errno.ENOMEM, errno.ENOSPC)


def _cookie_key(cookie: int) -> bytes:
    return struct.pack("=Q", cookie)


# --- the pid filter and the listeners map ------------------------------------


def fill_pid_filter(owners: Any, pids: Iterable[int]) -> None:
    """Put ``pids`` into the "owners" filter map (before attach, at load)."""
    for pid in pids:
        owners.update(struct.pack("=I", pid), b"\x01")


def add_pids(tracer: Any, pids: Iterable[int]) -> None:
    """Widen a loaded tracer's --pid filter: each pid goes into the "owners"
    map and then into ``tracer.pids``, one at a time."""
    owners = tracer.map("owners")
    for pid in pids:
        fill_pid_filter(owners, (pid,))
        tracer.pids.append(pid)


def add_listener(tracer: Any, netns_ino: int, port: int, family: int, tgid: int) -> bool:
    """Name who listens on a port in the "listeners" map, unless the kernel
    saw that listen() itself.  True if written, False if the kernel had it
    already; other failures raise :class:`LibbpfError`."""
    key = bytes(abi.PtListenKey(netns_ino & 0xFFFFFFFF, port, family))
    try:
        tracer.map("listeners").update(key, struct.pack("=I", tgid), BPF_NOEXIST)
    except LibbpfError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    return True


def seed_listeners(tracer: Any, rows: np.ndarray, owner: np.ndarray, res: SeedResult) -> int:
    """Name pre-existing listeners' owners (``owner``: a pid per row, 0 when
    unknown) in the kernel's "listeners" map, so children born after start
    are attributed to them (and counted under --pid)."""
    try:
        tracer.map("listeners")
    except Exception:  # an object or backend without the map
        return 0
    n = 0
    for i in np.flatnonzero((rows["state"] == int(S.LISTEN)) & (owner != 0)).tolist():
        try:
            if add_listener(tracer, int(rows["netns"][i]), int(rows["lport"][i]), int(rows["family"][i]),
                            int(owner[i])):
                n += 1
        except LibbpfError as exc:
            if len(res.errors) < 10:
                res.errors.append(f"listeners: {exc}")
    return n


# --- seeding -------------------------------------------------------------------


def seed_records(rows: np.ndarray, seen_ns: int) -> np.ndarray:
    """Table records (SOCK_DTYPE) for sock_diag inventory rows, as seeded:
    ``PT_F_SEEDED | PT_F_BIRTH_UNKNOWN``, birth 0, ``counted`` 0 (they stay
    out of the histograms: their lifetimes are unknown), the state sock_diag
    reports and ``state_ns`` the time of the dump (so "time in state" reads
    "at least").  The owner columns are left for the caller."""
    recs = np.zeros(len(rows), SOCK_DTYPE)
    recs["state_ns"] = seen_ns
    recs["ino"] = rows["inode"]
    recs["netns_ino"] = rows["netns"].astype(np.uint32)
    recs["state"] = rows["state"]
    recs["direction"] = np.where(rows["state"] == int(S.LISTEN), int(abi.Direction.LISTEN),
                                 int(abi.Direction.UNKNOWN))
    recs["flags"] = abi.PT_F_SEEDED | abi.PT_F_BIRTH_UNKNOWN
    for name in ("family", "lport", "rport", "laddr", "raddr"):
        recs[name] = rows[name]
    return recs


def midlife_count(tracer: Any) -> int | None:
    """The kernel's count of sockets first seen mid-life (records it created
    for sockets older than the tracer), or None if unreadable."""
    try:
        return poll.read_totals(tracer).stat(abi.Stat.MIDLIFE)
    except Exception:
        return None


def insert_new(tracer: Any, socks: Any, keys: np.ndarray, states: np.ndarray,
               records: Callable[[np.ndarray], np.ndarray], res: SeedResult) -> np.ndarray:
    """Insert the records whose keys the kernel does not have yet, never
    overwriting one the kernel made; returns which went in.

    BPF_MAP_UPDATE_BATCH cannot take BPF_NOEXIST (the kernel accepts only
    BPF_F_LOCK per element), and one BPF_NOEXIST update per socket costs a
    syscall each (0.4 s per 100k sockets here).  So: read which keys exist
    (one batch lookup), write the others in one batch, and bracket both
    with the kernel's MIDLIFE counter.  For a socket that existed at the
    dump, the kernel makes a record in two ways only: midlife(), which
    counts before it inserts, and the deferred birth of an accepted child
    still in SYN_RECV (its "embryo"), so those few go in one by one with
    BPF_NOEXIST.  An unchanged counter then proves nothing was overwritten;
    when it moved, :func:`repair` checks the seeded records against a
    fresh dump.

    ``states`` are the sockets' states; ``records(idx)`` builds the records
    of keys ``idx`` (SOCK_DTYPE), asked SEED_CHUNK at a time.
    """
    before = midlife_count(tracer)
    existing, _ = reads.read_socks(tracer, narrow=True)
    have = np.isin(keys, existing)
    del existing
    res.existed = int(have.sum())
    one_by_one = ~have & (states == int(S.SYN_RECV))
    todo = np.flatnonzero(~have & ~one_by_one)
    ok = np.zeros(len(keys), dtype=bool)
    errs: list[int] = []
    for at in range(0, len(todo), SEED_CHUNK):
        part = todo[at : at + SEED_CHUNK]
        _, failures = socks.update_batch(np.ascontiguousarray(keys[part]), records(part), len(part))
        ok[part] = True
        for j, err in failures:
            ok[part[j]] = False
            errs.append(err)
    after = midlife_count(tracer)
    for i in np.flatnonzero(one_by_one).tolist():
        try:
            socks.update(keys[i].tobytes(), records(np.array([i]))[0].tobytes(), BPF_NOEXIST)
            ok[i] = True
        except LibbpfError as exc:
            if exc.errno == errno.EEXIST:
                res.existed += 1
            else:
                errs.append(exc.errno)
    for err in errs:
        res.failed += 1
        if not _is_full(err) and len(res.errors) < 10:
            res.errors.append(f"insert: {os.strerror(err)}")
    res.midlife_during = -1 if before is None or after is None else after - before
    return ok


def _untouched_seeded(socks: Any, key: bytes) -> np.ndarray | None:
    """The record under ``key`` if it is still as seeded (no transition since)."""
    raw = socks.lookup(key, SOCK_DTYPE.itemsize)
    if raw is None:
        return None
    rec = np.frombuffer(raw, SOCK_DTYPE)[0]
    if not (rec["flags"] & abi.PT_F_SEEDED) or rec["transitions"] != 0:
        return None  # the kernel has moved it on since: its record is current
    return rec


def repair(socks: Any, keys: np.ndarray, states: np.ndarray, ok: np.ndarray, live: np.ndarray,
           res: SeedResult) -> None:
    """The kernel saw sockets change state while we seeded (see
    :func:`insert_new`): a seeded record that is still untouched but whose
    socket is now in another state may have overwritten the kernel's own.
    Rewrite those from the fresh dump (``live``), as seeded records."""
    order = np.argsort(live["cookie"], kind="stable")
    lk = live["cookie"][order]
    if not len(lk):
        return
    pos, hit = find_sorted(lk, keys)
    found = ok & hit
    now_state = live["state"][order][pos]
    for i in np.flatnonzero(found & (now_state != states)).tolist():
        key = _cookie_key(int(keys[i]))
        seeded = _untouched_seeded(socks, key)
        if seeded is None:
            continue
        rec = seeded.copy()
        rec["state"] = now_state[i]
        rec["state_ns"] = time.monotonic_ns()
        try:
            socks.update(key, rec.tobytes(), BPF_EXIST)
            res.repaired += 1
        except LibbpfError:
            continue


def write_seeded(tracer: Any, sess: Redump, states: int, rows: np.ndarray,
                 records: Callable[[np.ndarray], np.ndarray], owner: np.ndarray, res: SeedResult) -> None:
    """Put the seeded records of the inventory ``rows`` (``records(idx)``
    builds those of rows ``idx``; ``owner``: each row's owner pid or 0) into
    the table, then the listeners' owners; with a fresh look through
    ``sess``, repair what changed state meanwhile and take back the records
    of sockets destroyed between the dump and their insert."""
    socks = tracer.map("socks")
    keys = np.ascontiguousarray(rows["cookie"], dtype=np.uint64)
    try:
        _write_seeded(tracer, sess, states, rows, records, owner, res, socks, keys)
    finally:
        socks_written(tracer)


def socks_written(tracer: Any) -> None:
    """Say that this process wrote "socks" (after the writes): readers
    keeping a walk of it walk it again (TracerHandle.socks_generation)."""
    tracer.socks_writes = getattr(tracer, "socks_writes", 0) + 1


def _write_seeded(tracer: Any, sess: Redump, states: int, rows: np.ndarray,
                  records: Callable[[np.ndarray], np.ndarray], owner: np.ndarray, res: SeedResult,
                  socks: Any, keys: np.ndarray) -> None:
    ok = insert_new(tracer, socks, keys, rows["state"], records, res)
    counts = np.bincount(rows["state"][ok], minlength=abi.PT_STATES)
    res.by_state = {TcpState.name_of(st): int(n) for st, n in enumerate(counts) if n}
    res.seeded = int(ok.sum())
    res.listeners = seed_listeners(tracer, rows, owner, res)
    if not res.seeded:
        return
    if res.midlife_during:
        repair(socks, keys, rows["state"], ok, sess.dump(states=states, fields=("cookie", "state")).rows, res)
    try:
        live = sess.cookies(states=states)
    except OSError as exc:
        res.errors.append(f"re-checking seeded sockets: {exc}")
        return  # cannot tell what closed: take nothing back
    live.sort()  # ours, sorted in place: the keys are then found by binary search, not a sort of both
    # A socket closed between the dump and its insert left a record no
    # transition will end: take back the untouched ones.
    for i in np.flatnonzero(ok & ~among(keys, live)).tolist():
        key = _cookie_key(int(keys[i]))
        if _untouched_seeded(socks, key) is not None and socks.delete(key):
            res.vanished += 1
            res.seeded -= 1
            name = TcpState.name_of(int(rows["state"][i]))
            res.by_state[name] -= 1
            if not res.by_state[name]:
                del res.by_state[name]


# --- reaping ---------------------------------------------------------------------


def reap(tracer: Any, cookie: int, state_ns: int, transitions: int) -> np.ndarray | None:
    """Delete the record of ``cookie`` if it is still the one the reaper
    judged (same ``state_ns`` and ``transitions``); returns the deleted
    record, or None (destroyed meanwhile, changed, or already gone)."""
    table = tracer.map("socks")
    key = _cookie_key(cookie)
    raw = table.lookup(key, SOCK_DTYPE.itemsize)
    if raw is None:
        return None  # destroyed meanwhile: the kernel counted it
    rec = np.frombuffer(raw, SOCK_DTYPE)[0]
    if (int(rec["state_ns"]), int(rec["transitions"])) != (state_ns, transitions):
        return None
    if not table.delete(key):
        return None
    socks_written(tracer)
    return rec


# --- the service ports map ----------------------------------------------------


def fill_services(svc_ports: Any, slots: Mapping[Any, int]) -> int:
    """Name services for the kernel: (port, role) -> slot into "svc_ports".
    ``slots`` maps pytracer.inventory.services.Service to 1..PT_SVC_SLOTS-1.
    Returns how many went in (a full map refuses the rest)."""
    n = 0
    for svc, slot in slots.items():
        key = bytes(abi.PtSvcKey(port=svc.port, role=int(svc.role)))
        try:
            svc_ports.update(key, struct.pack("=I", slot))
            n += 1
        except OSError as exc:
            if not _is_full(exc.errno):
                raise
    return n


def add_services(tracer: Any, found: Iterable[Any]) -> int:
    """Give services found while running the slots still free, in order;
    slots already given keep their port.  Returns how many were added."""
    have = tracer.services
    free = sorted(set(range(1, abi.PT_SVC_SLOTS)) - set(have.values()))
    new = [s for s in dict.fromkeys(found) if s not in have][: len(free)]
    slots = dict(zip(new, free))
    if slots:
        fill_services(tracer.map("svc_ports"), slots)
        have.update(slots)
    return len(slots)
