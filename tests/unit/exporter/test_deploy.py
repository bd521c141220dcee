"""deploy/: rules pass promtool, every query names metrics the exporter
really exports, the dashboard has the promised panels, and the systemd unit
and DaemonSet keep to least privilege."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pytracer.exporter.collector import TracerCollector
from pytracer.exporter.families import ExportOptions, MapStat, ProgramStat, ScrapeInput, build_families
from pytracer.kernel import abi
from pytracer.kernel.environment import CAPABILITY_USES
from pytracer.table.health import TableFill
from tests.privileges import documented_capabilities, granted

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
DASHBOARD = DEPLOY / "grafana" / "pytracer-dashboard.json"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
UNIT = DEPLOY / "systemd" / "pytracer-exporter.service"

# Grafana variables, as the kernel-tier test also substitutes them.
GRAFANA_VARS = {"$__rate_interval": "5m", "$instance": ".*"}


def promtool() -> str:
    exe = shutil.which("promtool")
    if not exe:
        pytest.fail("promtool is required (apt install prometheus; scripts/install-deps does it)")
    return exe


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, val in GRAFANA_VARS.items():
                expr = expr.replace(var, val)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def exported_metric_names() -> set[str]:
    """Every series name a scrape can produce, from a fully populated input."""
    from tests.unit.exporter.test_families import leak_report, make_totals, service_stats, sock_table

    agg = abi.PtAgg()
    agg.hists[0].slots[10] = 1
    agg.hists[abi.PT_HIST_STATE + 1].slots[10] = 1
    agg.transitions[1][8] = 1
    rep = leak_report()
    rep.flags.append(SimpleNamespace(kind="idle_reset", comm="api", pid=1, seconds=300.0,
                                     extra={"service": "5432", "role": "client", "t_seconds": 300.0, "hits": 3}))
    inp = ScrapeInput(
        totals=make_totals([agg]), socks=sock_table([(1, 1)]), poll_seconds=0.1, leaks=rep,
        services=service_stats(),
        maps=[MapStat("socks", 1, 10)], programs=[ProgramStat("p", 1, 1, 0)], bpf_stats=True,
        hooks=[("state", "tp_btf", "p")], build={"version": "v"}, table=TableFill(1, 10, 0, 0, 10.0),
    )
    fams, _ = build_families(inp, ExportOptions())
    collector = TracerCollector(None, scanner=SimpleNamespace(scan=None))
    collector.leak_scan_seconds = 1.0
    fams += collector._self_families(0.1)
    names = set()
    for f in fams:
        for s in f.samples:
            names.add(s.name)
    return names


METRIC = re.compile(r"\b(pytracer_[a-z_]+)\b")


def test_promtool_check_and_unit_tests_pass() -> None:
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=120,
                       cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    quiet = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if not a.get("exp_alerts")}
    names = {r["alert"] for r in alert_rules()}
    assert names <= firing, f"alerts without a firing test: {names - firing}"
    assert names <= quiet, f"alerts without a quiet test: {names - quiet}"


def test_required_alerts_exist() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    assert "pytracer_flagged_sockets" in exprs["PytracerCloseWaitStuck"]
    assert "pytracer_close_wait_sockets" in exprs["PytracerCloseWaitGrowing"]
    assert "idle_established" in exprs["PytracerIdleKeepalivePileUp"]
    assert "histogram_quantile(0.95" in exprs["PytracerConnectionLifetimeP95High"]
    assert "pytracer_process_fd_usage_ratio" in exprs["PytracerFdExhaustionAhead"]
    assert "pytracer_lost_events_total" in exprs["PytracerLosingData"]
    assert "pytracer_socket_table_full" in exprs["PytracerSocketTableFull"]
    assert "pytracer_service_connection_lifetime_seconds_bucket" in exprs["PytracerServiceLifetimeP95High"]
    assert 'pytracer_service_connections_ended_total{ender="reset_received"}' in exprs["PytracerIdleResets"]


def test_queries_name_only_metrics_the_exporter_exports() -> None:
    names = exported_metric_names()
    used = set()
    for _, expr in dashboard_queries():
        used |= set(METRIC.findall(expr))
    for rule in alert_rules():
        used |= set(METRIC.findall(rule["expr"]))
    assert used, "no metric names found"
    assert used <= names, f"queries use metrics nobody exports: {sorted(used - names)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (as a recording rule)."""
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"pytracer_dashboard:query{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}
    path = tmp_path / "dash-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_has_the_promised_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dash["panels"]]
    for needle in ("lifetime percentiles", "lifetime heatmap", "Sockets by state", "Stuck CLOSE_WAIT",
                   "Idle keep-alive", "TIME_WAIT pressure", "Socket table fill", "Lost events"):
        assert any(needle.lower() in t.lower() for t in titles), needle
    heat = next(p for p in dash["panels"] if p["type"] == "heatmap")
    assert heat["targets"][0]["format"] == "heatmap"
    # importable: a datasource input, and every panel uses the variable
    assert dash["__inputs"][0]["type"] == "datasource"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_daemonset_least_privilege() -> None:
    docs = list(yaml.safe_load_all(DAEMONSET.read_text()))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Exactly the set docs/privileges.md says the deploy files grant (Kubernetes drops the CAP_ prefix).
    assert {"CAP_" + c for c in sc["capabilities"]["add"]} == granted()
    assert c["args"][0] == "export"
    assert not any(v.get("hostPath", {}).get("path") == "/" for v in pod["volumes"])
    for m in c["volumeMounts"]:
        if m["name"] in ("tracefs", "web-config"):
            assert m["readOnly"] is True


def test_privileges_doc_covers_every_capability_the_code_names() -> None:
    documented = documented_capabilities()
    assert {name for name, _, _ in CAPABILITY_USES} <= set(documented)
    assert {"CAP_BPF", "CAP_PERFMON"} <= granted() and "CAP_SYS_ADMIN" not in granted()


def test_systemd_unit_least_privilege() -> None:
    text = UNIT.read_text()
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    assert caps and set(caps.group(1).split()) == granted()  # exactly docs/privileges.md's set
    assert not re.search(r"^AmbientCapabilities=", text, re.M)
    assert re.search(r"^ExecStart=\S+/tracer export --listen 127\.0\.0\.1:", text, re.M)
    assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
    analyze = shutil.which("systemd-analyze")
    if analyze:
        r = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
        bad = [ln for ln in (r.stdout + r.stderr).splitlines() if "pytracer-exporter" in ln]
        assert r.returncode == 0 and not bad, r.stderr

