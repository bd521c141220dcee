"""Web config (exporter-toolkit format), basic auth, TLS and the HTTP server,
in-process on loopback with a plain registry (no kernel needed)."""

from __future__ import annotations

import base64
import http.client
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from pytracer.exporter import ExportError
from pytracer.exporter.web import ExporterServer, make_server, parse_listen
from pytracer.exporter.webconfig import BasicAuth, load_web_config, parse_web_config

PASSWORD = "s3cret-pass"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )
    return d


def hashed(pw: str) -> str:
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9808") == ("127.0.0.1", 9808)
    assert parse_listen("[::1]:9808") == ("::1", 9808)
    assert parse_listen(":9808") == ("", 9808)
    for bad in ("9808", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ExportError):
            parse_listen(bad)


def test_web_config_relative_paths_resolve_next_to_the_file(certs: Path, tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    shutil.copy(certs / "cert.pem", tmp_path / "tls" / "cert.pem")
    shutil.copy(certs / "key.pem", tmp_path / "tls" / "key.pem")
    cfg = tmp_path / "web.yml"
    cfg.write_text(
        "tls_server_config:\n  cert_file: tls/cert.pem\n  key_file: tls/key.pem\n  min_version: TLS13\n"
        f"basic_auth_users:\n  prom: '{hashed('x')}'\n"
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    )
    wc = load_web_config(str(cfg))
    assert wc.cert_file == str(tmp_path / "tls" / "cert.pem")
    assert wc.min_version == ssl.TLSVersion.TLSv1_3
    assert set(wc.users) == {"prom"}
    assert wc.headers == {"X-Frame-Options": "deny"}


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"tls_server_config": {"cert_file": "c.pem"}}, "needs both cert_file and key_file"),
        ({"tls_server_config": {"cert_file": "nope.pem", "key_file": "nope.pem"}}, "no such file"),
        ({"basic_auth_users": {"u": "plaintext"}}, "expected a bcrypt hash"),
        ({"bogus": 1}, "unknown key(s) bogus"),
        ({"tls_server_config": {"cipher_suites": ["TLS_AES_128_GCM_SHA256"], "cert_file": "a", "key_file": "b"}},
         "cipher_suites is not supported"),
        ({"http_server_config": {"nope": 1}}, "unknown http_server_config"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_web_config_errors_are_one_clear_line(doc: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError) as e:
        parse_web_config(doc, str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_client_auth_needs_a_ca(certs: Path) -> None:
    doc = {"tls_server_config": {"cert_file": "cert.pem", "key_file": "key.pem",
                                 "client_auth_type": "RequireAndVerifyClientCert"}}
    with pytest.raises(ExportError, match="needs client_ca_file"):
        parse_web_config(doc, str(certs))


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def test_basic_auth() -> None:
    auth = BasicAuth({"prom": hashed(PASSWORD).encode()})
    assert auth.check(basic("prom", PASSWORD))
    assert auth.check(basic("prom", PASSWORD))  # cached path
    assert not auth.check(basic("prom", PASSWORD + "x"))
    assert not auth.check(basic("nobody", PASSWORD))
    assert not auth.check(None)
    assert not auth.check("Bearer abc")
    assert not auth.check("Basic !!!notbase64")
    assert not auth.check("Basic " + base64.b64encode(b"no-colon").decode())
    assert BasicAuth({}).check(None)  # no users configured: open


@pytest.fixture
def serve(certs: Path) -> Iterator[Any]:
    started: list[ExporterServer] = []

    def start(doc: dict | None) -> ExporterServer:
        registry = CollectorRegistry()
        Gauge("pytracer_test_value", "a test gauge", registry=registry).set(42)
        srv = make_server("127.0.0.1:0", parse_web_config(doc, str(certs)), registry)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def get(srv: ExporterServer, path: str = "/metrics", headers: dict | None = None,
        tls: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    host, port = srv.server_address[:2]
    conn = (http.client.HTTPSConnection(host, port, context=tls, timeout=10) if tls
            else http.client.HTTPConnection(host, port, timeout=10))
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_plain_server_paths(serve: Any) -> None:
    srv = serve(None)
    code, _, body = get(srv)
    assert code == 200 and b"pytracer_test_value 42.0" in body
    assert get(srv, "/")[0] == 200
    assert get(srv, "/nope")[0] == 404
    code, hdrs, body = get(srv, headers={"Accept-Encoding": "gzip"})
    assert hdrs.get("Content-Encoding") == "gzip"
    import gzip

    assert b"pytracer_test_value" in gzip.decompress(body)


def test_tls_and_basic_auth(serve: Any, certs: Path) -> None:
    doc = {"tls_server_config": {"cert_file": "cert.pem", "key_file": "key.pem"},
           "basic_auth_users": {"prom": hashed(PASSWORD)},
           "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}}}
    srv = serve(doc)
    ctx = ssl.create_default_context(cafile=str(certs / "cert.pem"))
    code, hdrs, _ = get(srv, tls=ctx)
    assert code == 401 and hdrs["WWW-Authenticate"].startswith("Basic")
    assert get(srv, tls=ctx, headers={"Authorization": basic("prom", "wrong")})[0] == 401
    code, hdrs, body = get(srv, tls=ctx, headers={"Authorization": basic("prom", PASSWORD)})
    assert code == 200 and b"pytracer_test_value" in body
    assert hdrs["X-Content-Type-Options"] == "nosniff"
    # Plain HTTP to the TLS port gets no metrics.
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        code, _, body = get(srv, headers={"Authorization": basic("prom", PASSWORD)})
        assert code != 200


def test_silent_client_does_not_block_others(serve: Any, certs: Path) -> None:
    """A TLS client that never sends a ClientHello must not stall the accept loop."""
    srv = serve({"tls_server_config": {"cert_file": "cert.pem", "key_file": "key.pem"}})
    silent = socket.create_connection(srv.server_address[:2], timeout=5)
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "cert.pem"))
        assert get(srv, tls=ctx)[0] == 200
    finally:
        silent.close()


def test_busy_port_is_one_clear_error() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ExportError) as e:
            make_server(f"127.0.0.1:{port}", None, CollectorRegistry())
        assert str(e.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"
    finally:
        holder.close()


class _SlowCollector:
    """A collector whose collect() waits until told, so a scrape is under way on demand."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        self.entered.set()
        self.release.wait(10)
        yield GaugeMetricFamily("pytracer_test_slow", "a slow gauge", value=1)


def test_stop_lets_the_scrape_under_way_finish_and_closes_idle_connections() -> None:
    registry = CollectorRegistry(auto_describe=False)
    slow = _SlowCollector()
    registry.register(slow)
    srv = make_server("127.0.0.1:0", None, registry)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host, port = srv.server_address[:2]
    # An idle kept-alive connection, served once before.
    idle = http.client.HTTPConnection(host, port, timeout=10)
    slow.release.set()
    idle.request("GET", "/")
    assert idle.getresponse().read()
    slow.release.clear()
    got: list[Any] = []

    def scrape() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            got.append((r.status, r.getheader("Connection"), r.read()))
        except Exception as exc:  # noqa: BLE001
            got.append(exc)
        finally:
            conn.close()

    t = threading.Thread(target=scrape)
    t.start()
    try:
        assert slow.entered.wait(10)
        threading.Timer(0.5, slow.release.set).start()
        t0 = time.monotonic()
        assert srv.stop(timeout=5) == 0
        assert time.monotonic() - t0 >= 0.4  # it waited for the scrape
        t.join(5)
        # The scrape under way was answered whole, and told the connection closes.
        assert len(got) == 1 and not isinstance(got[0], Exception), got
        status, connection, body = got[0]
        assert status == 200 and connection == "close" and b"pytracer_test_slow 1.0" in body
        # The idle connection was closed, and no new request is answered.
        idle.request("GET", "/")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            idle.getresponse()
    finally:
        slow.release.set()
        idle.close()
        srv.server_close()
