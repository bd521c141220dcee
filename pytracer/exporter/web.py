"""The exporter's HTTP(S) server, and its web config (TLS, basic auth).

The web-config file is in the Prometheus exporter-toolkit format
(``tls_server_config``, ``basic_auth_users``, ``http_server_config``), the
one node_exporter reads.  :func:`parse_web_config` refuses what it cannot
honour (Go cipher suite names, curve preferences, allowed SANs) with one
clear :class:`~pytracer.exporter.ExportError`, rather than ignoring it and
serving with other settings than the file asks for.  :func:`make_server`
binds before the tracer loads anything into the kernel, so a busy port
fails early.

(Over 500 lines, one job: the HTTP side of `tracer export`.  The web config,
TLS, basic auth and the per-client limits that keep scrapes answered under
abuse (head deadlines, size limits, a connection cap) are all that job.)

The server knows nothing of the tracer: it serves whatever registry it is
given (:func:`make_registry`, to which ``tracer export`` adds the
:class:`~pytracer.exporter.collector.TracerCollector`).
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import re
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

from prometheus_client.registry import CollectorRegistry

from pytracer import __version__
from pytracer.exporter import ExportError

log = logging.getLogger("pytracer.exporter")

DEFAULT_LISTEN = "127.0.0.1:9808"

# --- web config (exporter-toolkit format) --------------------------------------

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_KEYS = {
    "cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version",
    "cipher_suites", "curve_preferences", "prefer_server_cipher_suites", "client_allowed_sans",
}
_UNSUPPORTED_TLS = {
    "cipher_suites": "Go cipher suite names have no OpenSSL equivalent here",
    "curve_preferences": "not supported",
    "client_allowed_sans": "not supported",
}


# A bcrypt hash in modular crypt format: $2a$/$2b$/$2y$, a two-digit cost, 22 + 31 characters.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# RFC 9110: a header name is a token; a value is visible characters, spaces and tabs (no CR, LF or NUL).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\U0010ffff]*")


@dataclass
class WebConfig:
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    client_auth: ssl.VerifyMode = ssl.CERT_NONE
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None


def parse_web_config(doc: Any, base_dir: str = ".") -> WebConfig:
    """Validate a parsed web-config document.  Relative paths are relative to
    the config file's directory, as in the exporter toolkit."""
    if doc is None:
        return WebConfig()
    if not isinstance(doc, dict):
        raise ExportError("web config: expected a mapping at the top level")
    unknown = set(doc) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise ExportError(f"web config: unknown key(s) {_names(unknown)}")
    wc = WebConfig()

    def path(v: Any, what: str) -> str:
        if not isinstance(v, str) or not v:
            raise ExportError(f"web config: tls_server_config.{what} must be a file path")
        p = v if os.path.isabs(v) else os.path.join(base_dir, v)
        if not os.path.isfile(p):
            raise ExportError(f"web config: tls_server_config.{what}: no such file {_show(p)}")
        return p

    tls = doc.get("tls_server_config")
    if tls:
        if not isinstance(tls, dict):
            raise ExportError("web config: tls_server_config must be a mapping")
        unknown = set(tls) - _TLS_KEYS
        if unknown:
            raise ExportError(f"web config: unknown tls_server_config key(s) {_names(unknown)}")
        for key, why in _UNSUPPORTED_TLS.items():
            if tls.get(key):
                raise ExportError(f"web config: tls_server_config.{key} is not supported by pytracer ({why})")
        if not tls.get("cert_file") or not tls.get("key_file"):
            raise ExportError("web config: tls_server_config needs both cert_file and key_file")
        wc.cert_file = path(tls["cert_file"], "cert_file")
        wc.key_file = path(tls["key_file"], "key_file")
        auth = tls.get("client_auth_type") or "NoClientCert"
        if not isinstance(auth, str) or auth not in _CLIENT_AUTH:
            raise ExportError(
                f"web config: client_auth_type {auth!r} is not supported (use one of {', '.join(_CLIENT_AUTH)})"
            )
        wc.client_auth = _CLIENT_AUTH[auth]
        if tls.get("client_ca_file"):
            wc.client_ca_file = path(tls["client_ca_file"], "client_ca_file")
        elif wc.client_auth != ssl.CERT_NONE:
            raise ExportError(f"web config: client_auth_type {auth} needs client_ca_file")
        for key in ("min_version", "max_version"):
            v = tls.get(key)
            if v is None:
                continue
            if not isinstance(v, str) or v not in _TLS_VERSIONS:
                raise ExportError(f"web config: {key} {v!r}: use one of {', '.join(_TLS_VERSIONS)}")
            setattr(wc, key, _TLS_VERSIONS[v])

    users = doc.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise ExportError("web config: basic_auth_users must map user names to bcrypt hashes")
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            raise ExportError(f"web config: basic_auth_users.{_show(user)}: expected a bcrypt hash ($2y$10$ and 53 "
                              "characters, as htpasswd -nbBC 10 prints it)")
        if not isinstance(user, (str, int)) or isinstance(user, bool) or not str(user):
            raise ExportError(f"web config: basic_auth_users: user name {user!r} is not a name")
        if ":" in str(user) or not str(user).isprintable():
            raise ExportError(f"web config: basic_auth_users: user name {user!r} contains ':' or a control character")
        wc.users[str(user)] = hashed.encode()
    if wc.users:
        try:
            import bcrypt  # noqa: F401, PLC0415
        except ImportError:
            raise ExportError("web config: basic_auth_users needs the bcrypt package (pip install bcrypt)") from None

    http = doc.get("http_server_config") or {}
    if not isinstance(http, dict):
        raise ExportError("web config: http_server_config must be a mapping")
    unknown = set(http) - {"headers", "http2"}
    if unknown:
        raise ExportError(f"web config: unknown http_server_config key(s) {_names(unknown)}")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise ExportError("web config: http_server_config.headers must be a mapping")
    for k, v in headers.items():
        if not isinstance(k, str) or not _HEADER_NAME.fullmatch(k):
            raise ExportError(f"web config: http_server_config.headers: {k!r} is not a header name")
        if isinstance(v, (dict, list, bool)) or v is None or not _HEADER_VALUE.fullmatch(str(v)):
            raise ExportError(f"web config: http_server_config.headers.{k}: the value must be one line of text")
        wc.headers[k] = str(v)
    return wc


def _show(v: Any) -> str:
    """A value from the file, for a one-line message: YAML keys may be numbers, or text with newlines."""
    return v if isinstance(v, str) and v.isprintable() else repr(v)


def _names(keys: set) -> str:
    return ", ".join(sorted(_show(k) for k in keys))


def load_web_config(path: str) -> WebConfig:
    import yaml  # noqa: PLC0415 - only needed with --web-config

    try:
        with open(path, "rb") as f:  # bytes: the YAML reader checks the encoding and says where it breaks
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise ExportError(f"web config {_show(path)}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ExportError(f"web config {_show(path)}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ExportError(f"web config {_show(path)}: not valid YAML (nested too deeply)") from None
    return parse_web_config(doc, os.path.dirname(os.path.abspath(path)))


def tls_context(wc: WebConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = wc.min_version
    if wc.max_version is not None:
        ctx.maximum_version = wc.max_version
    try:
        ctx.load_cert_chain(wc.cert_file, wc.key_file)  # type: ignore[arg-type]
        if wc.client_ca_file:
            ctx.load_verify_locations(cafile=wc.client_ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ExportError(f"web config: cannot load TLS certificate/key: {exc}") from None
    ctx.verify_mode = wc.client_auth
    return ctx


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes.

    bcrypt is slow on purpose (tens of ms), and Prometheus sends the same
    credentials every scrape, so successful checks are cached by a keyed
    hash of the credentials (as the exporter toolkit does).  Unknown users
    still cost one bcrypt check, so timing does not reveal user names.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self.users = dict(users)
        self._key = os.urandom(32)
        self._ok: dict[bytes, bool] = {}
        self._lock = threading.Lock()
        # One uncached bcrypt check at a time: a flood of wrong passwords then
        # costs one core, not all of them, and cached (good) clients never wait.
        self._slow = threading.Semaphore(1)
        if not self.users:
            return
        import bcrypt  # noqa: PLC0415 - only with basic_auth_users

        self._bcrypt = bcrypt
        # The dummy hash costs what the users' hashes cost (the highest), so a
        # wrong password takes as long for an unknown user as for a known one.
        cost = max(int(h.split(b"$")[2]) for h in self.users.values())
        self._dummy = bcrypt.hashpw(b"pytracer-dummy", bcrypt.gensalt(rounds=cost))

    def check(self, header: str | None) -> bool:
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        user, sep, password = raw.partition(":")
        if not sep:
            return False
        token = hmac.new(self._key, raw.encode(), hashlib.sha256).digest()
        with self._lock:
            if token in self._ok:
                return True
        hashed = self.users.get(user)
        try:
            with self._slow:  # checkpw compares in constant time
                ok = self._bcrypt.checkpw(password.encode(), hashed or self._dummy) and hashed is not None
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                if len(self._ok) >= 64:
                    self._ok.clear()
                self._ok[token] = True
        return ok


# --- HTTP server -----------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``.  An empty host means every interface."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise ExportError(f"--listen {listen!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or "[" in host or "]" in host:
            raise ExportError(f"--listen {listen!r}: expected [IPV6]:PORT, e.g. [::1]:9808")
    elif ":" in host or "[" in host or "]" in host:
        raise ExportError(f"--listen {listen!r}: put an IPv6 address in brackets, e.g. [::1]:9808")
    if not re.fullmatch(r"[0-9]{1,5}", port):  # not int(): it takes " 80", "8_0" and other scripts' digits
        raise ExportError(f"--listen {listen!r}: port {port!r} is not a number")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ExportError(f"--listen {listen!r}: port out of range")
    if not host.isprintable() or any(c.isspace() for c in host) or "\0" in host:
        raise ExportError(f"--listen {listen!r}: {host!r} is not a host name or address")
    return host, p


LANDING = b"""<html><head><title>pytracer exporter</title></head><body>
<h1>pytracer exporter</h1><p><a href="/metrics">Metrics</a></p></body></html>
"""


# Limits on what a client may send and how slowly (the request head: its
# line and headers; GET and HEAD have no body).
HEAD_TIMEOUT_S = 10.0  # from a request's first byte to its last header (and a TLS handshake)
IDLE_TIMEOUT_S = 30.0  # a kept-alive connection waiting for its next request
WRITE_TIMEOUT_S = 30.0  # a client reading the response
MAX_REQUEST_LINE = 8 << 10
MAX_HEADER_BYTES = 16 << 10  # every header line together
MAX_HEADERS = 64
MAX_CONNECTIONS = 4096  # at once; past it a new connection is closed at once (lowered to fit RLIMIT_NOFILE)


class _Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    server_version = f"pytracer/{__version__}"
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # errors about a bad request line still get a status line

    def handle_one_request(self) -> None:
        """One request, with the limits above (BaseHTTPRequestHandler allows
        64 KiB lines, 100 headers and as long as each byte arrives within the
        socket timeout: a slow-loris client could hold a thread for ever)."""
        srv = self.server
        try:
            srv.deadlines.set(self.connection, IDLE_TIMEOUT_S)
            if not self.rfile.peek(1):
                self.close_connection = True
                return
            srv.deadlines.set(self.connection, HEAD_TIMEOUT_S)
            head = self._read_head()
            if head is None:
                return
            self.raw_requestline, rest = head
            words = self.raw_requestline.split()
            if len(words) == 2 or (len(words) > 2 and words[-1].startswith(b"HTTP/0.")):
                # HTTP/0.9: answered without status line or headers; refused, in silence.
                self.close_connection = True
                return
            rfile, self.rfile = self.rfile, io.BytesIO(rest)  # parse_request reads the headers from it
            try:
                if not self.parse_request():
                    return
            finally:
                self.rfile = rfile
            srv.deadlines.set(self.connection, WRITE_TIMEOUT_S)
            if not srv.requests.enter():
                self.close_connection = True  # stopping: closed unanswered, as by a server gone
                return
            try:
                method = getattr(self, f"do_{self.command}", None)
                if method is None:
                    self.send_error(501, f"Unsupported method ({self.command!r})")
                    return
                method()
                self.wfile.flush()
            finally:
                if srv.requests.leave():
                    self.close_connection = True  # stopping: no next request on this connection
        except (TimeoutError, OSError, ValueError):
            # A deadline shut the socket, the client went away, or the connection was torn down.
            self.close_connection = True

    def _read_head(self) -> tuple[bytes, bytes] | None:
        """(request line, header lines) within the size limits; None once an
        error has been sent or the client closed."""
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            self.close_connection = True
            return None
        if len(line) > MAX_REQUEST_LINE or not line.endswith(b"\n"):
            self._refuse(414, "Request line too long")
            return None
        rest = []
        size = 0
        while True:
            h = self.rfile.readline(MAX_HEADER_BYTES - size + 1)
            size += len(h)
            if size > MAX_HEADER_BYTES or (h and not h.endswith(b"\n")) or len(rest) > MAX_HEADERS:
                self._refuse(431, "Request header fields too large")
                return None
            rest.append(h)
            if h in (b"\r\n", b"\n", b""):
                return line, b"".join(rest)

    def _refuse(self, code: int, message: str) -> None:
        self.requestline, self.request_version, self.command = "", "HTTP/1.1", "GET"
        self.close_connection = True
        self.send_error(code, message)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, code: int, body: bytes, ctype: str, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**self.server.web.headers, **(extra or {})}.items():
            self.send_header(k, v)
        if self.server.requests.closing:
            self.send_header("Connection", "close")  # the server is stopping
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        srv = self.server
        if not srv.auth.check(self.headers.get("Authorization")):
            challenge = {"WWW-Authenticate": 'Basic realm="pytracer"'}
            self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8", challenge)
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            body = encoder(srv.registry)
            extra = {}
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                body = gzip.compress(body, compresslevel=1)
                extra["Content-Encoding"] = "gzip"
            self._send(200, body, ctype, extra)
        elif path == "/":
            self._send(200, LANDING, "text/html; charset=utf-8")
        else:
            self._send(404, b"Not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET


class ExporterServer(ThreadingHTTPServer):
    """A threading HTTP(S) server for one registry.

    TLS handshakes run in the connection's own thread (not in the accept
    loop), and every connection has a timeout, so a slow or silent client
    cannot stall other scrapes.
    """

    daemon_threads = True
    # The listen backlog (the kernel caps it at net.core.somaxconn).  A burst of
    # new connections past it drops SYNs, and a scrape caught in it waits the
    # 1 s SYN retransmit: 1,000 connections opened at once overflowed 128.
    request_queue_size = 4096
    allow_reuse_address = True
    timeout_seconds = 30.0  # on every blocking read or write, under the deadlines

    def __init__(self, host: str, port: int, web: WebConfig, registry: CollectorRegistry) -> None:
        fam = socket.AF_INET
        if host:
            try:
                fam = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            except ValueError:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                fam, host = infos[0][0], infos[0][4][0]
        self.address_family = fam
        self.web = web
        self.registry = registry
        self.ssl_context = tls_context(web) if web.tls else None
        self.auth = BasicAuth(web.users)
        self.max_connections = _connection_budget()
        self.deadlines = Deadlines()
        self.requests = InFlight()
        super().__init__((host or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in str(host):
            host = f"[{host}]"
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}/metrics"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if len(self.deadlines) >= self.max_connections:
            log.debug("refusing %s: %d connections open", addr, len(self.deadlines))
            sock.close()
            raise OSError(errno.EMFILE, "too many connections")  # socketserver drops this request
        sock.settimeout(self.timeout_seconds)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.deadlines.set(sock, HEAD_TIMEOUT_S)  # the TLS handshake and the first request head
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", client_address, exc)
                return
        super().finish_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.deadlines.forget(request)
        super().shutdown_request(request)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.deadlines.start()
        try:
            super().serve_forever(poll_interval)
        finally:
            self.deadlines.stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("error serving %s", client_address, exc_info=True)

    def stop(self, timeout: float = 5.0) -> int:
        """Stop serving, once: accept no more connections, let the responses
        under way finish (for at most `timeout` s; a scrape cut short would
        reach its client as a truncated body), then close the connections left
        idle.  Returns how many responses were still under way at the timeout."""
        self.shutdown()
        left = self.requests.close(timeout)
        self.deadlines.expire_all()
        return left


class InFlight:
    """The responses under way, and whether new ones may start."""

    def __init__(self) -> None:
        self._n = 0
        self._closing = False
        self._cv = threading.Condition()

    @property
    def closing(self) -> bool:
        return self._closing

    def enter(self) -> bool:
        with self._cv:
            if self._closing:
                return False
            self._n += 1
            return True

    def leave(self) -> bool:
        """True when the server is stopping."""
        with self._cv:
            self._n -= 1
            self._cv.notify_all()
            return self._closing

    def close(self, timeout: float) -> int:
        with self._cv:
            self._closing = True
            self._cv.wait_for(lambda: self._n == 0, timeout)
            return self._n


class Deadlines:
    """A deadline for each open connection, enforced by one thread: a socket
    past its deadline is shut down, which ends the blocking read or write of
    the thread serving it.  (A socket timeout alone bounds each read, not a
    request: a client sending one byte every few seconds never trips it.)"""

    def __init__(self, tick_s: float = 0.25) -> None:
        self._due: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tick_s = tick_s
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._due)

    def set(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + seconds

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pytracer-http-deadlines", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def expire_all(self) -> None:
        """Shut every open connection down now (a reader waiting for its next request returns at once)."""
        with self._lock:
            late, self._due = list(self._due), {}
        _shut(late)

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            now = time.monotonic()
            with self._lock:
                late = [s for s, t in self._due.items() if t <= now]
                for s in late:
                    del self._due[s]
            _shut(late)


def _shut(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            # The plain socket's shutdown, also under TLS (SSLSocket.shutdown would unwrap).
            socket.socket.shutdown(s, socket.SHUT_RDWR)
        except OSError:
            pass


def _connection_budget() -> int:
    """Connections served at once: MAX_CONNECTIONS, within RLIMIT_NOFILE,
    whose soft limit is raised to the hard one if need be (as Go does at
    start; the systemd default soft limit is 1,024)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = MAX_CONNECTIONS + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    except (OSError, ValueError):
        return MAX_CONNECTIONS // 4
    # The rest of the process (maps, sock_diag sockets, /proc) keeps 256 fds.
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft - 256))


def make_server(listen: str, web: WebConfig | None, registry: CollectorRegistry) -> ExporterServer:
    """Bind (but do not serve yet).  A busy port is one clear ExportError."""
    host, port = parse_listen(listen)
    try:
        return ExporterServer(host, port, web or WebConfig(), registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ExportError(f"cannot listen on {listen}: address already in use") from None
        raise ExportError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


def make_registry() -> CollectorRegistry:
    """A registry with the standard process_* metrics of this process; the
    tracer's collector is registered once the programs are loaded."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    return registry
