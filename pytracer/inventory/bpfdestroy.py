"""Ending TCP sockets with bpf_sock_destroy() from an iter/tcp program (v6.5+).

The other way to end a socket (``tracer destroy --via bpf``); the default is
SOCK_DESTROY over sock_diag (:mod:`pytracer.inventory.destroy`).  The object
is bpf/sockdestroy.bpf.c: user space writes the cookies of the sockets to
end into its ``victims`` map and runs the iterator once per network
namespace, creating the iterator fd from a thread inside that namespace
(the tcp iterator walks the namespace of the task that creates the fd,
net/ipv4/tcp_ipv4.c ``bpf_iter_init_tcp``); the program ends each victim it
visits and writes the kfunc's answer into ``results``.

Differences from sock_diag: the socket is found by its cookie alone while
the kernel walks every TCP socket of the namespace (one pass for all
victims there), and only full sockets can be ended (a FIN_WAIT2 or
TIME_WAIT minisocket answers EOPNOTSUPP).  A kernel without the kfunc (before
v6.5, or without BTF) fails to load the object: :class:`BpfEnderUnavailable`,
one line.
"""

from __future__ import annotations

import errno
import struct
from typing import Iterable

from pytracer.inventory.netns import own_netns, run_in_netns
from pytracer.inventory.procs import NetnsRef
from pytracer.kernel import libbpf

OBJECT = "bpf/sockdestroy.bpf.o"
PROGRAM = "end_sockets"
BATCH = 1024  # PT_DESTROY_MAX in bpf/sockdestroy.bpf.c


class BpfEnderUnavailable(RuntimeError):
    """The object cannot be loaded or attached here; the message says why."""


class BpfEnder:
    """The loaded sockdestroy object and its iterator link.  A context manager."""

    def __init__(self, refs: dict[int, NetnsRef]) -> None:
        self.refs = refs
        self.obj: libbpf.BpfObject | None = None
        self.link: libbpf.Link | None = None

    def __enter__(self) -> BpfEnder:
        if self.obj is not None:
            return self
        try:
            data = libbpf.packaged_object(OBJECT, "PYTRACER_SOCKDESTROY_OBJECT")
        except OSError as exc:
            raise BpfEnderUnavailable(f"pytracer/{OBJECT} is missing ({exc.strerror}): build it with `make`") from None
        try:
            self.obj = libbpf.BpfObject(data, "pt_sockdestroy")
            self.obj.load()
            self.link = self.obj.program(PROGRAM).attach_iter()
        except (libbpf.LibbpfError, libbpf.LibbpfMissing) as exc:
            self.close()
            raise BpfEnderUnavailable(
                f"cannot end sockets with bpf_sock_destroy() here (it needs v6.5+ with BTF): {exc}; "
                "use --via sock_diag") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.link is not None:
            self.link.destroy()
            self.link = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def end(self, netns: int, cookies: Iterable[int]) -> dict[int, int]:
        """End the sockets with these cookies in namespace ``netns``:
        cookie -> 0 (ended) or errno; ENOENT for a socket the iterator did not visit (gone)."""
        assert self.obj is not None and self.link is not None
        link = self.link
        victims, results = self.obj.map("victims"), self.obj.map("results")
        todo = [int(c) for c in cookies]
        out: dict[int, int] = {}
        for start in range(0, len(todo), BATCH):
            batch = todo[start : start + BATCH]
            keys = [struct.pack("=Q", c) for c in batch]
            for k in keys:
                victims.update(k, b"\x01")
            try:
                if netns == own_netns():
                    self._run(link)
                else:
                    ref = self.refs.get(netns)
                    if ref is None:
                        raise OSError(errno.ENOENT, f"network namespace {netns} is not known")
                    run_in_netns(ref, lambda: self._run(link))
                for c, k in zip(batch, keys):
                    got = results.lookup(k, 4)
                    out[c] = -struct.unpack("=i", got)[0] if got is not None else errno.ENOENT
            finally:
                for k in keys:
                    victims.delete(k)
                    results.delete(k)
        return out

    @staticmethod
    def _run(link: libbpf.Link) -> None:
        mm, _ = link.read_iter(1 << 20)
        mm.close()
