"""Harness for the exporter tests: the real `tracer export`, a real
Prometheus (Debian package) and workload processes, each cleaned up.

Ports come from bind(0); every wait has a deadline.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .conftest import Proc, fdinfo_ids, tracer_cmd  # noqa: F401 - fdinfo_ids re-exported for test_exporter

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKLOAD = HERE / "exporter_workload.py"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_workload(role: str, *args: Any, netns: str | None = None, prefix: list[str] | None = None) -> Proc:
    argv = [*(prefix or []), sys.executable, str(WORKLOAD), role, *map(str, args)]
    proc = Proc(argv, netns=netns, name=role)
    proc.expect("ready")
    return proc


class Exporter:
    """`tracer export` as users run it, on a free loopback port."""

    def __init__(self, *args: str, tmp: Path, prefix: list[str] | None = None, scheme: str = "http",
                 auth: tuple[str, str] | None = None, cafile: str | None = None) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}/metrics"
        self.auth = auth
        self.ctx = ssl.create_default_context(cafile=cafile) if scheme == "https" else None
        self.log = tmp / f"export-{self.port}.log"
        self._err = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.argv = [*(prefix or []), *tracer_cmd(), "export", "--listen", f"127.0.0.1:{self.port}", *args]
        self.p = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self._err, text=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.log.read_text()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"tracer export exited {self.p.returncode}: {self.stderr()}")
            if "serving " in self.stderr():
                return
            time.sleep(0.1)
        raise TimeoutError(f"tracer export not serving within {timeout}s: {self.stderr()}")

    def get(self, timeout: float = 30.0) -> str:
        req = urllib.request.Request(self.url)
        if self.auth:
            req.add_header("Authorization", "Basic " + b64encode(":".join(self.auth).encode()).decode())
        with urllib.request.urlopen(req, timeout=timeout, context=self.ctx) as r:
            return r.read().decode()

    def scrape(self) -> tuple[dict[tuple[str, tuple], float], float, str]:
        """Samples keyed by (name, sorted labels), the wall time, the text."""
        t0 = time.perf_counter()
        text = self.get()
        seconds = time.perf_counter() - t0
        samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples, seconds, text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self._err.close()
        return self.p.returncode


def series(samples: dict, name: str, **match: str) -> dict[tuple, float]:
    return {lab: v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == v2
                                                                            for k, v2 in match.items())}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


class Prometheus:
    """The Debian prometheus binary with a temp config and TSDB."""

    def __init__(self, tmp: Path, jobs: dict[str, tuple[list[str], str]], rule_files: list[Path] = (),
                 interval: str = "1s") -> None:
        """``jobs``: job name -> (targets, scrape interval = timeout)."""
        if not shutil.which("prometheus"):
            raise RuntimeError("prometheus is required (apt install prometheus)")
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        rules = []
        for i, rf in enumerate(rule_files):
            dst = self.dir / f"rules{i}.yml"
            shutil.copy(rf, dst)
            rules.append(str(dst))
        cfg = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": rules,
            "scrape_configs": [
                {"job_name": job, "scrape_interval": iv, "scrape_timeout": iv, "static_configs": [{"targets": tg}]}
                for job, (tg, iv) in jobs.items()
            ],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is YAML
        self.log = open(self.dir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError("prometheus exited: " + (self.dir / "prometheus.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus not ready within 60s")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.query(expr)
            if res:
                return res
            time.sleep(0.5)
        raise TimeoutError(f"no data for {expr!r} within {timeout}s")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self.log.close()


def ss_states(netns: str | None = None, filt: str = "", minisocks: bool | None = None) -> dict[str, int]:
    """Socket counts per state from `ss -tanoH`, kernel names (CLOSE_WAIT, ...).

    ``minisocks``: None counts every socket, False only full sockets, True
    only timewait minisockets (TIME_WAIT, and FIN_WAIT2 orphans, which show
    the timewait timer).
    """
    argv = ["ss", "-tanoH"] + filt.split()
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    counts: dict[str, int] = {}
    names = {"ESTAB": "ESTABLISHED", "SYN-RECV": "SYN_RECV", "UNCONN": "CLOSE", "FIN-WAIT-1": "FIN_WAIT1",
             "FIN-WAIT-2": "FIN_WAIT2"}
    for line in out.splitlines():
        if minisocks is not None and ("timer:(timewait" in line) != minisocks:
            continue
        st = line.split()[0]
        name = names.get(st, st.replace("-", "_"))
        counts[name] = counts.get(name, 0) + 1
    return counts


def bpftool_ids(what: str) -> set[int]:
    out = subprocess.run(["bpftool", "-j", what, "show"], capture_output=True, text=True, timeout=30)
    return {int(x["id"]) for x in json.loads(out.stdout or "[]")}
