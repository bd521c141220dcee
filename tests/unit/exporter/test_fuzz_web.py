"""Property tests of the exporter's outside input: the web-config YAML,
``--listen``, the Authorization header, and raw HTTP request lines and
headers sent to a real server on loopback.  Refusals are one-line
ExportErrors; the server answers every request (or closes it) and keeps
serving a good client."""

from __future__ import annotations

import base64
import http.client
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import bcrypt
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge

from pytracer.exporter import ExportError
from pytracer.exporter.web import make_server, parse_listen
from pytracer.exporter.webconfig import BasicAuth, WebConfig, load_web_config, parse_web_config

pytestmark = pytest.mark.fuzz

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
TOP_KEYS = ["tls_server_config", "basic_auth_users", "http_server_config"]
TLS_KEYS = ["cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["TLS12", "NoClientCert", "cert.pem", HASH, "headers"]))
keys = st.one_of(st.text(max_size=10), st.integers(-3, 3), st.booleans(), st.none(),
                 st.sampled_from(TOP_KEYS + TLS_KEYS + ["headers", "http2", "prom"]))
docs = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
# Documents shaped like a web config, with any value at any place.
shaped = st.fixed_dictionaries({}, optional={
    "tls_server_config": st.one_of(docs, st.dictionaries(st.sampled_from(TLS_KEYS), docs, max_size=4)),
    "basic_auth_users": st.one_of(docs, st.dictionaries(keys, st.one_of(docs, st.just(HASH)), max_size=3)),
    "http_server_config": st.one_of(docs, st.fixed_dictionaries({}, optional={
        "headers": st.one_of(docs, st.dictionaries(keys, docs, max_size=3))})),
})


def one_line_refusal(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ExportError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc), str(exc)
        return None


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("webcfg")
    for name in ("cert.pem", "key.pem"):
        (d / name).write_text("not checked by parse_web_config, only by tls_context\n")
    return d


@given(st.one_of(shaped, docs))
@example({1: "x", "a": "y"})  # unknown keys of mixed types: sorting them raised TypeError
@example({"tls_server_config": {"cert_file": "cert.pem", "key_file": "key.pem", "client_auth_type": [1]}})
@example({"tls_server_config": {"cert_file": "cert.pem", "key_file": "key.pem", "min_version": {}}})
@example({"http_server_config": {"headers": {"X-A": "1\r\nSet-Cookie: s=1"}}})  # header injection
@example({"http_server_config": {"headers": {"Bad Name:": "1"}}})
@example({"basic_auth_users": {"prom": "$2y$10$short"}})  # would fail every login, silently
@example({"tls_server_config": {"cert_file": "\n", "key_file": 1}})  # (make fuzz) a path with a newline in the message
@example({"basic_auth_users": {"\r": None}})  # (make fuzz) a user name with a CR in the message
def test_any_document_is_a_config_or_one_line_error(tls_dir: Path, doc: Any) -> None:
    wc = one_line_refusal(parse_web_config, doc, str(tls_dir))
    if wc is None:
        return
    assert isinstance(wc, WebConfig)
    for k, v in wc.headers.items():
        assert k.isascii() and ":" not in k and not any(c in v for c in "\r\n\0")
    for user, hashed in wc.users.items():
        assert ":" not in user and len(hashed) == 60


@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 shaped.map(lambda d: yaml.safe_dump(d).encode())))
@example(b"a: \xe9\n")  # not UTF-8: UnicodeDecodeError escaped as a traceback
@example(b"[" * 2000)
@example(b"http_server_config:\n  headers:\n    X: &a [1, 2]\n")
def test_any_file_is_a_config_or_one_line_error(tls_dir: Path, raw: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=tls_dir, suffix=".yml") as f:
        f.write(raw)
        f.flush()
        one_line_refusal(load_web_config, f.name)


@given(st.one_of(st.text(max_size=30), st.from_regex(r"\A(\[[0-9a-f:]{0,12}\]|[a-z0-9.]{0,10}):[0-9]{0,6}\Z")))
@example("127.0.0.1:8_0")  # int() reads 80
@example("127.0.0.1: 80")
@example("127.0.0.1:٨٠")  # Arabic-Indic digits: int() reads 80
@example("::1:9808")  # an IPv6 address without brackets
@example("[::1:9808")
@example("a b:80")
def test_listen(listen: str) -> None:
    got = one_line_refusal(parse_listen, listen)
    if got is None:
        return
    host, port = got
    # What was accepted is exactly what was written: ASCII digits, a host without space or control characters.
    written = listen.rpartition(":")[2]
    assert written.isascii() and written.isdigit() and int(written) == port <= 65535
    assert listen in (f"{host}:{written}", f"[{host}]:{written}")
    assert host.isprintable() and " " not in host and (":" not in host or listen.startswith("["))


AUTH = BasicAuth({"prom": HASH.encode()})


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


@given(st.one_of(st.none(), st.text(max_size=80), st.tuples(st.text(max_size=20), st.text(max_size=80)).map(
    lambda up: basic(*up)), st.text(max_size=60).map(lambda t: "Basic " + t)))
@example(basic("prom", "pw\0"))
@example(basic("prom", "p" * 100))  # bcrypt takes 72 bytes at most
def test_authorization_header(header: str | None) -> None:
    assert AUTH.check(header) == (header == basic("prom", "pw"))


# --- raw requests to a real server ---------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    registry = CollectorRegistry()
    Gauge("pytracer_fuzz_value", "a test gauge", registry=registry).set(7)
    srv = make_server("127.0.0.1:0", None, registry)
    srv.timeout_seconds = 2.0
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def good_scrape(srv: Any) -> bytes:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=5)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200
        return r.read()
    finally:
        conn.close()


token = st.text(st.characters(codec="ascii"), max_size=12)
methods = st.one_of(st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "get", "PRI"]), token)
paths = st.one_of(st.sampled_from(["/metrics", "/", "/metrics?x=1", "*", "//", "/%00", "/" + "a" * 300]),
                  st.text(max_size=40))
versions = st.one_of(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1 x"]), token)
header_lines = st.lists(st.one_of(
    st.tuples(st.sampled_from(["Host", "Accept", "Accept-Encoding", "Authorization", "Connection",
                               "Content-Length", "Transfer-Encoding", "Expect"]), st.text(max_size=40)),
    st.tuples(token, st.text(max_size=40))), max_size=6)


@given(methods, paths, versions, header_lines, st.sampled_from([b"\r\n", b"\n"]), st.binary(max_size=40))
@example("GET", "/metrics", "", [], b"\r\n", b"")  # HTTP/0.9: the metrics without a status line or headers
@example("GET", "/metrics", "HTTP/0.9", [], b"\r\n", b"")
@example("GET", "/metrics", "HTTP/2.0", [], b"\r\n", b"")  # the 505 went out without a status line
@example("GET", "/metrics", "HTTP/1.1", [("X", "y" * 20000)], b"\r\n", b"")
@example("GET", "/metrics", "HTTP/1.1", [("Content-Length", "-1")], b"\r\n", b"")
@example("GET", "/metrics", "HTTP/1.1", [("Expect", "100-continue")], b"\r\n", b"")
@example("GET", "/metrics", "HTTP/1.1", [("Accept", "\u00e9")], b"\r\n", b"")
def test_any_request_gets_an_answer_and_good_scrapes_go_on(server: Any, method: str, path: str, version: str,
                                                          headers: list, eol: bytes, tail: bytes) -> None:
    lines = [f"{method} {path} {version}"] + [f"{k}: {v}" for k, v in headers]
    raw = eol.join(s.encode("utf-8", "surrogateescape") for s in lines) + eol + eol + tail
    with socket.create_connection(server.server_address[:2], timeout=5) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while len(got) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pytest.fail(f"no answer or close within 5 s to {raw[:200]!r}")
    # Either nothing (the server closed an unparseable or HTTP/0.9 request) or a status line.
    assert got == b"" or got.startswith(b"HTTP/1."), got[:200]
    assert b"pytracer_fuzz_value 7.0" in good_scrape(server)
