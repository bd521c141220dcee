"""Fixtures for the leak detection tests; test_leaks.py loads them with
``pytest_plugins``.

* ``leak_tracer``: one loaded tracer per module, attached (and seeded) before
  any scenario starts, so its records carry exact state times.
* ``leak_net``: parametrized indirectly with "loopback4", "loopback6",
  "veth4" or "veth6"; veth namespaces are created per test and deleted by a
  finalizer.
* ``spawn``: starts helper processes; every one is killed by a finalizer.
* ``nginx``: a real nginx (Debian nginx-light) with a temporary prefix and
  config on a free port, stopped through its master (so no worker is
  orphaned) and its prefix removed.

Names start with ``leak_`` or are specific enough not to collide with the
shared kernel-tier conftest.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .leaky_support import NGINX_CONF, Helper, LeakNet, Nginx, _ip, require_root, ss, wait_until


@pytest.fixture
def spawn() -> Iterator[Callable[..., Helper]]:
    started: list[Helper] = []

    def start(argv: list[str], netns: str | None = None, name: str = "helper") -> Helper:
        h = Helper([str(a) for a in argv], netns, name)
        started.append(h)
        return h

    yield start
    for h in reversed(started):
        h.kill()


@pytest.fixture
def leak_net(request: pytest.FixtureRequest) -> Iterator[LeakNet]:
    """``request.param``: "loopback4", "loopback6", "veth4" or "veth6"."""
    require_root()
    kind, fam = request.param[:-1], int(request.param[-1])
    if kind == "loopback":
        yield LeakNet("loopback", fam, None, None, "127.0.0.1" if fam == 4 else "::1")
        return
    tag = f"{os.getpid() % 100000}{random.randint(100, 999)}"
    n = random.randint(1, 250)
    net = LeakNet("veth", fam, f"ptl{tag}s", f"ptl{tag}c", f"10.{n}.91.1" if fam == 4 else f"fd00:{n:x}:91::1")
    try:
        for ns in (net.server_ns, net.client_ns):
            assert ns is not None
            _ip("netns", "add", ns)
            net.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        vs, vc = f"vls{tag}"[:15], f"vlc{tag}"[:15]
        _ip("link", "add", vs, "netns", str(net.server_ns), "type", "veth", "peer", "name", vc,
            "netns", str(net.client_ns))
        for ns, dev, a4, a6 in ((net.server_ns, vs, f"10.{n}.91.1", f"fd00:{n:x}:91::1"),
                                (net.client_ns, vc, f"10.{n}.91.2", f"fd00:{n:x}:91::2")):
            _ip("-n", str(ns), "addr", "add", f"{a4}/24", "dev", dev)
            _ip("-n", str(ns), "-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            _ip("-n", str(ns), "link", "set", dev, "up")
        yield net
    finally:
        for ns in net.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def leak_tracer() -> Iterator[Any]:
    require_root()
    from pytracer.inventory.seed import seed
    from pytracer.kernel.core import Tracer

    tracer = Tracer()
    with tracer:
        seed(tracer)
        yield tracer


@pytest.fixture
def nginx(spawn: Callable[..., Helper]) -> Iterator[Callable[..., Nginx]]:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(exe):
        pytest.fail("nginx is required for the kernel tier (apt install nginx-light)")
    dirs: list[str] = []
    started: list[Nginx] = []

    def start(host: str, netns: str | None, keepalive: int = 600) -> Nginx:
        prefix = tempfile.mkdtemp(prefix="pytracer-nginx-")
        dirs.append(prefix)
        if netns:
            port = 8080  # a namespace of our own: nothing else listens there
        else:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            port = s.getsockname()[1]
            s.close()
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        conf = Path(prefix) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, keepalive=keepalive, listen=listen, connections=256))
        master = spawn([exe, "-p", prefix, "-c", str(conf), "-e", f"{prefix}/error.log"], netns, "nginx")
        ng = Nginx(master, port, prefix)
        started.append(ng)

        def listening() -> bool:
            return any(r.state == "LISTEN" and r.lport == port for r in ss(netns, port)) and bool(ng.worker_pids())

        try:
            wait_until(listening, 20, "nginx to listen")
        except AssertionError:
            log = (Path(prefix) / "error.log").read_text() if (Path(prefix) / "error.log").exists() else ""
            raise AssertionError(f"nginx did not start: {log[-2000:]}") from None
        return ng

    yield start
    for ng in started:
        # A fast shutdown through the master takes the workers with it; a
        # SIGKILLed master would orphan them.
        workers = ng.worker_pids()
        if ng.master.p.poll() is None:
            ng.master.p.terminate()
            try:
                ng.master.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
