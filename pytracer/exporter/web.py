"""The exporter's HTTP(S) server.

:func:`make_server` binds before the tracer loads anything into the kernel,
so a busy port fails early.  The server applies the web config read by
:mod:`pytracer.exporter.webconfig` (the TLS context, basic auth, extra
headers), and per-client limits keep scrapes answered under abuse (head
deadlines, size limits, a connection cap).

The server knows nothing of the tracer: it serves whatever registry it is
given (:func:`make_registry`, to which ``tracer export`` adds the
:class:`~pytracer.exporter.collector.TracerCollector`).
"""

from __future__ import annotations

import errno
import gzip
import io
import ipaddress
import logging
import re
import resource
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

from prometheus_client.registry import CollectorRegistry

from pytracer import __version__
from pytracer.exporter import ExportError
from pytracer.exporter.webconfig import BasicAuth, WebConfig, tls_context

log = logging.getLogger("pytracer.exporter")

DEFAULT_LISTEN = "127.0.0.1:9808"

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
