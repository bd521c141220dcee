"""The exporter's web configuration: what ``--web-config`` says, validated,
and the TLS context and basic-auth check built from it.

The web-config file is in the Prometheus exporter-toolkit format
(``tls_server_config``, ``basic_auth_users``, ``http_server_config``), the
one node_exporter reads.  :func:`parse_web_config` refuses what it cannot
honour (Go cipher suite names, curve preferences, allowed SANs) with one
clear :class:`~pytracer.exporter.ExportError`, rather than ignoring it and
serving with other settings than the file asks for.

This module says what the file means; the HTTP server
(:mod:`pytracer.exporter.web`) imports it and applies it, never the reverse.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

from pytracer.exporter import ExportError

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
