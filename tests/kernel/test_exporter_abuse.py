"""`tracer export` under abuse, with a good client scraping all along.

One real exporter with basic auth (plain HTTP) takes slow-loris clients,
1,000 idle connections, oversized headers, a flood of bad passwords and
pipelined requests; a second one with mutual TLS takes handshake garbage
and clients with bad certificates.  Meanwhile a good client scrapes every
20 ms on a new connection each time: every scrape must succeed, p99 under
100 ms in each phase.  Figures go to $PYTRACER_EXPORT_REPORT/abuse.json.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import resource
import socket
import ssl
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import bcrypt
import pytest

from .exporter_helpers import Exporter
from .soak import percentile

pytestmark = pytest.mark.kernel

REPORT_DIR = Path(os.environ.get("PYTRACER_EXPORT_REPORT", "/tmp/pytracer-export-report"))
P99_LIMIT_S = 0.100
PASSWORD = "correct horse battery"
HEAD_TIMEOUT_S = 10  # pytracer.exporter.web.HEAD_TIMEOUT_S: the whole request head must arrive within it
FIGURES: dict[str, Any] = {}


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_cert(d: Path, name: str, ca: str | None, cn: str, san: str | None = None) -> None:
    """An EC key and certificate: self-signed when ``ca`` is None, else signed by ``ca``."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
    ext = d / f"{name}.ext"
    ext.write_text((f"subjectAltName={san}\n" if san else "") + ("basicConstraints=critical,CA:TRUE\n"
                                                                  if name.startswith("ca") else ""))
    if ca is None:
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-key", str(d / f"{name}.key"), "-days", "2",
                "-extfile", str(ext), "-out", str(d / f"{name}.pem"))
    else:
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"), "-CAkey",
                str(d / f"{ca}.key"), "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                "-out", str(d / f"{name}.pem"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_cert(d, "ca", None, "pytracer test CA")
    make_cert(d, "ca_rogue", None, "someone else's CA")
    make_cert(d, "server", "ca", "localhost", "IP:127.0.0.1")
    make_cert(d, "client", "ca", "prometheus")
    make_cert(d, "client_rogue", "ca_rogue", "prometheus")
    make_cert(d, "client_self", None, "prometheus")
    return d


@pytest.fixture(scope="module", autouse=True)
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "abuse.json").write_text(json.dumps(FIGURES, indent=1))


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


class GoodClient(threading.Thread):
    """Scrapes every ``period`` on a new connection; latencies per phase."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.port, self.ctx, self.period = port, ctx, period
        self.stop_ev = threading.Event()
        self.lat: list[float] = []
        self.errors: list[str] = []

    def one(self) -> None:
        t0 = time.perf_counter()
        conn = (http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=10) if self.ctx
                else http.client.HTTPConnection("127.0.0.1", self.port, timeout=10))
        try:
            conn.request("GET", "/metrics", headers={"Authorization": basic("prometheus", PASSWORD)})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200 or b"pytracer_build_info" not in body:
                self.errors.append(f"status {r.status}")
                return
        except OSError as exc:
            self.errors.append(repr(exc))
            return
        finally:
            conn.close()
        self.lat.append(time.perf_counter() - t0)

    def run(self) -> None:
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            self.one()
            self.stop_ev.wait(max(0.0, self.period - (time.monotonic() - t0)))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        n_lat, n_err = len(self.lat), len(self.errors)
        yield
        lat = sorted(self.lat[n_lat:])
        errors = self.errors[n_err:]
        p99 = percentile(lat, 0.99)  # nearest rank: one stall in 100 scrapes shows in max_ms, two fail
        FIGURES[name] = {"scrapes": len(lat), "errors": len(errors), "p50_ms": round(statistics.median(lat) * 1e3, 1)
                         if lat else None, "p99_ms": round(p99 * 1e3, 1),
                         "max_ms": round(lat[-1] * 1e3, 1) if lat else None,
                         "over_limit": sum(t >= P99_LIMIT_S for t in lat)}
        assert not errors, (name, errors[:5])
        assert len(lat) >= 20, (name, FIGURES[name])
        assert p99 < P99_LIMIT_S, (name, FIGURES[name])


def closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, OSError):
        return False


@pytest.fixture(scope="module")
def quiet_pid() -> Iterator[int]:
    """The exporters' --pid: an idle process, so what is measured is the HTTP
    server under abuse, not the cost of a whole-host scrape on a host that
    other tests may be filling with sockets."""
    p = subprocess.Popen(["sleep", "3600"])
    yield p.pid
    p.kill()
    p.wait()


SCOPE = ("--leak-interval", "3600")  # one leak scan at start, none competing with the measured scrapes


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, quiet_pid: int) -> Iterator[tuple[Exporter, GoodClient]]:
    tmp = tmp_path_factory.mktemp("abuse")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    (tmp / "web.yml").write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    exp = Exporter("--web-config", str(tmp / "web.yml"), "--pid", str(quiet_pid), *SCOPE, tmp=tmp,
                   auth=("prometheus", PASSWORD))
    good = GoodClient(exp.port)
    try:
        exp.wait_ready()
        good.start()
        with good.phase("baseline"):
            time.sleep(3)
        yield exp, good
    finally:  # also when the baseline fails: nothing left running or attached
        good.stop_ev.set()
        if good.is_alive():
            good.join(timeout=15)
        rc = exp.stop()
    assert rc == 0 and "Traceback" not in exp.stderr(), exp.stderr()


def test_slow_loris(plain: tuple[Exporter, GoodClient]) -> None:
    exp, good = plain
    socks = []
    with good.phase("slow-loris (200 clients, 1 byte/s)"):
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", exp.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            socks.append(s)
        t0 = time.monotonic()
        alive = list(socks)
        while time.monotonic() - t0 < HEAD_TIMEOUT_S + 3 and alive:
            still = []
            for s in alive:
                try:
                    s.sendall(b"X")
                    still.append(s)
                except OSError:
                    pass  # closed by the server
            alive = still
            time.sleep(1)
    FIGURES["slow-loris (200 clients, 1 byte/s)"]["still_sending_after_s"] = {HEAD_TIMEOUT_S + 3: len(alive)}
    try:
        # The head deadline closed every one of them, however steadily they sent.
        assert all(closed_by_peer(s, 3) for s in alive), f"{len(alive)} slow-loris connections outlived the deadline"
    finally:
        for s in socks:
            s.close()


def test_1000_idle_connections(plain: tuple[Exporter, GoodClient]) -> None:
    exp, good = plain
    socks = []
    try:
        with good.phase("1000 idle connections"):
            for _ in range(1000):
                socks.append(socket.create_connection(("127.0.0.1", exp.port), timeout=10))
            time.sleep(5)
            # Still served: a request on one of the idle connections.
            s = socks[-1]
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic("prometheus", PASSWORD).encode()
                      + b"\r\nConnection: close\r\n\r\n")
            s.settimeout(10)
            assert s.recv(12) == b"HTTP/1.1 200"
        FIGURES["1000 idle connections"]["exporter_threads"] = threads(exp.pid)
    finally:
        for s in socks:
            s.close()
    # Every connection's thread ends once its client goes.
    deadline = time.monotonic() + 20
    while threads(exp.pid) > 50 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert threads(exp.pid) <= 50


def threads(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("Threads:")[1].split()[0])


@pytest.mark.parametrize("what,request_head,status", [
    ("request line of 1 MiB", b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n", b"414"),
    ("header of 1 MiB", b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", b"431"),
    ("1,000 headers", b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(1000)) + b"\r\n",
     b"431"),
    ("64 headers of 1 KiB", b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 1024)
                                                                   for i in range(64)) + b"\r\n", b"431"),
])
def test_oversized_headers(plain: tuple[Exporter, GoodClient], what: str, request_head: bytes, status: bytes) -> None:
    exp, good = plain
    with good.phase(f"oversized: {what}"):
        deadline = time.monotonic() + 2
        answered = 0
        while time.monotonic() < deadline or answered < 3:
            with socket.create_connection(("127.0.0.1", exp.port), timeout=10) as s:
                try:
                    s.sendall(request_head)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused before we finished: the answer is already there
                got = s.recv(64)
                assert got.startswith(b"HTTP/1.1 " + status), (what, got)
                assert closed_by_peer(s, 5)
                answered += 1


def test_bad_passwords_flood(plain: tuple[Exporter, GoodClient]) -> None:
    exp, good = plain
    stop = threading.Event()
    counts = {"401": 0, "other": 0}

    def attacker(i: int) -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", exp.port, timeout=30)
            try:
                conn.request("GET", "/metrics", headers={"Authorization": basic(f"user{i}", f"guess{time.time()}")})
                counts["401" if conn.getresponse().status == 401 else "other"] += 1
            except OSError:
                counts["other"] += 1
            finally:
                conn.close()

    attackers = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(8)]
    with good.phase("bad passwords (8 attackers)"):
        for t in attackers:
            t.start()
        time.sleep(6)
        stop.set()
        for t in attackers:
            t.join(timeout=30)
    FIGURES["bad passwords (8 attackers)"]["attempts"] = dict(counts)
    assert counts["other"] == 0 and counts["401"] > 0, counts


def test_pipelined_requests(plain: tuple[Exporter, GoodClient]) -> None:
    exp, good = plain
    auth = b"Authorization: " + basic("prometheus", PASSWORD).encode() + b"\r\n"
    paths = [b"/metrics", b"/", b"/nope", b"/metrics"]
    with good.phase("HTTP/1.1 pipelining"):
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", exp.port), timeout=10) as s:
                s.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (p, auth) for p in paths))
                f = s.makefile("rb")
                statuses, bodies = [], []
                for _p in paths:  # the answers, in order, each framed by its Content-Length
                    statuses.append(int(f.readline().split()[1]))
                    length = 0
                    while (line := f.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    bodies.append(f.read(length))
                assert statuses == [200, 200, 404, 200]
                assert b"pytracer_build_info" in bodies[0] and b"pytracer_build_info" in bodies[3]
            time.sleep(0.1)


def timed_attempts(port: int, user: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            t0 = time.perf_counter()
            conn.request("GET", "/metrics", headers={"Authorization": basic(user, f"wrong{i}")})
            assert conn.getresponse().status == 401
            out.append(time.perf_counter() - t0)
        finally:
            conn.close()
    return out


def test_unknown_and_known_users_take_the_same_time(tmp_path: Path, quiet_pid: int) -> None:
    """A wrong password costs the same for a user that exists as for one that does not, so
    timing does not reveal user names, whatever cost the configured hashes use."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    exp = Exporter("--web-config", str(tmp_path / "web.yml"), "--pid", str(quiet_pid), *SCOPE, tmp=tmp_path)
    try:
        exp.wait_ready()
        timed_attempts(exp.port, "warmup", 1)
        known, unknown = [], []
        for _ in range(4):  # interleaved, so a change in machine load hits both
            known += timed_attempts(exp.port, "prometheus", 2)
            unknown += timed_attempts(exp.port, "nobody", 2)
        k, u = statistics.median(known), statistics.median(unknown)
        FIGURES["constant-time basic auth (cost 12)"] = {"known_user_ms": round(k * 1e3, 1),
                                                         "unknown_user_ms": round(u * 1e3, 1)}
        assert abs(k - u) / max(k, u) < 0.35, FIGURES["constant-time basic auth (cost 12)"]
    finally:
        assert exp.stop() == 0


def test_mtls_bad_certificates_and_handshake_garbage(tmp_path: Path, pki: Path, quiet_pid: int) -> None:
    (tmp_path / "web.yml").write_text(
        f"tls_server_config:\n  cert_file: {pki / 'server.pem'}\n  key_file: {pki / 'server.key'}\n"
        f"  client_ca_file: {pki / 'ca.pem'}\n  client_auth_type: RequireAndVerifyClientCert\n")
    exp = Exporter("--web-config", str(tmp_path / "web.yml"), "--pid", str(quiet_pid), *SCOPE, tmp=tmp_path)

    def client_ctx(cert: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if cert:
            ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
        return ctx

    def handshake_refused(ctx: ssl.SSLContext) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", exp.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    # TLS 1.3: the server's verdict on the client's certificate arrives with the first read.
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    return not s.recv(12).startswith(b"HTTP/1.1 200")
        except (ssl.SSLError, OSError):
            return True

    try:
        exp.wait_ready()
        good = GoodClient(exp.port, client_ctx("client"))
        good.start()
        try:
            with good.phase("mTLS: bad client certificates and handshake garbage"):
                t0 = time.monotonic()
                tries = 0
                while time.monotonic() - t0 < 6:
                    for bad in (None, "client_rogue", "client_self"):
                        assert handshake_refused(client_ctx(bad)), bad
                    with socket.create_connection(("127.0.0.1", exp.port), timeout=10) as s:
                        # Not a ClientHello.  Half of all random first bytes have the high bit set, which
                        # reads as an SSLv2 record header announcing up to 32 KiB: the handshake then waits
                        # for the rest, and only the 10 s head deadline ends it.
                        s.sendall(os.urandom(512))
                        assert closed_by_peer(s, 12)
                    with socket.create_connection(("127.0.0.1", exp.port), timeout=10) as s:
                        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # plain HTTP to the TLS port
                        assert closed_by_peer(s, 5)
                    tries += 1
                # A client that starts a handshake and goes silent is dropped at the deadline.
                stall = socket.create_connection(("127.0.0.1", exp.port), timeout=10)
                stall.sendall(b"\x16\x03\x01\x00\xff")  # a record header promising a ClientHello
                t1 = time.monotonic()
                assert closed_by_peer(stall, HEAD_TIMEOUT_S + 5)
                stalled_s = time.monotonic() - t1
                stall.close()
            FIGURES["mTLS: bad client certificates and handshake garbage"].update(
                rounds=tries, stalled_handshake_closed_after_s=round(stalled_s, 1))
            assert stalled_s <= HEAD_TIMEOUT_S + 2
        finally:
            good.stop_ev.set()
            good.join(timeout=15)
    finally:
        assert exp.stop() == 0 and "Traceback" not in exp.stderr(), exp.stderr()
