"""Alert rules, their unit tests, the metric catalogue and the dashboard, checked with
Prometheus' own promtool and against the metrics a running node serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mesh.consensus.config import RaftSection

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
CATALOGUE = PROMETHEUS / "METRICS.md"
DASHBOARD = REPO / "deploy" / "grafana" / "fleetmesh.json"
# Series Prometheus makes itself, and labels every scraped series carries.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"job", "instance"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed: run `make deps-apt` (Debian's prometheus package)")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120)


# -- the catalogue ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    type: str
    labels: frozenset[str]
    meaning: str
    status: str

    def sample_names(self) -> set[str]:
        """The names of the series this metric appears as in a scrape."""
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


_ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| (?P<type>\w+) \|\s*(?P<labels>[^|]*?)\s*\| (?P<meaning>.+) \| "
                  r"(?P<status>\w+) \|$")


def catalogue() -> dict[str, CatalogueEntry]:
    entries: dict[str, CatalogueEntry] = {}
    for line in CATALOGUE.read_text().splitlines():
        match = _ROW.match(line)
        if match is None:
            assert not line.startswith("| `"), f"METRICS.md row not in the table's form: {line}"
            continue
        name = match["name"]
        assert name not in entries, f"{name} is listed twice in METRICS.md"
        labels = frozenset(re.findall(r"`(\w+)`", match["labels"]))
        entries[name] = CatalogueEntry(name, match["type"], labels, match["meaning"], match["status"])
    return entries


def test_catalogue_names_follow_prometheus_conventions():
    entries = catalogue()
    assert len(entries) >= 35
    for e in entries.values():
        assert re.fullmatch(r"fleetmesh_[a-z][a-z0-9_]*[a-z0-9]", e.name), e.name
        assert e.type in {"counter", "gauge", "histogram"}, f"{e.name}: type {e.type}"
        assert e.status in {"exported", "planned"}, f"{e.name}: status {e.status}"
        assert e.name.endswith("_total") == (e.type == "counter"), f"{e.name}: only counters end in _total"
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", e.name), f"{e.name}: use base units"
        if e.type == "histogram" or "timestamp" in e.name:
            assert e.name.endswith("_seconds"), f"{e.name}: times are in seconds"
        for label in e.labels:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", label) and label not in TARGET_LABELS, (e.name, label)


@needs_promtool
def test_catalogue_passes_promtools_metric_lint():
    """Render the catalogue as an exposition and let `promtool check metrics` lint the names."""
    lines = []
    for e in catalogue().values():
        lines += [f"# HELP {e.name} {e.meaning}", f"# TYPE {e.name} {e.type}"]
        labels = ",".join(f'{label}="x"' for label in sorted(e.labels))
        if e.type == "histogram":
            lines += [f'{e.name}_bucket{{{labels + "," if labels else ""}le="+Inf"}} 1',
                      f"{e.name}_sum{{{labels}}} 1", f"{e.name}_count{{{labels}}} 1"]
        else:
            lines.append(f"{e.name}{{{labels}}} 1")
    done = promtool("check", "metrics", stdin="\n".join(lines) + "\n")
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@needs_promtool
def test_promtools_metric_lint_catches_a_bad_name():
    exposition = ("# HELP fleetmesh_x_requests a\n# TYPE fleetmesh_x_requests counter\n"
                  "fleetmesh_x_requests 1\n")
    done = promtool("check", "metrics", stdin=exposition)
    assert "counter metrics should have \"_total\" suffix" in done.stdout + done.stderr


# -- alert rules ------------------------------------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool_check_rules():
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_alert_rules_pass_their_unit_tests():
    done = promtool("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_has_unit_tests_that_see_it_fire_and_stay_quiet():
    cases: dict[str, list[dict]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(case)
    for rule in alert_rules():
        own = cases.get(rule["alert"], [])
        assert any(c["exp_alerts"] for c in own), f"{rule['alert']} is never shown firing in alerts_test.yml"
        assert any(not c["exp_alerts"] for c in own) or "for" not in rule, \
            f"{rule['alert']} has `for:` but no test shows it quiet before that time"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


@needs_promtool
@pytest.mark.parametrize("mistake", [("for: 5m", "for: 15m"), ("> 30 * 60", "> 60 * 60"),
                                     ("< 3 * 86400", "< 2 * 86400"),
                                     ("== 0\n        for: 2m", "== 1\n        for: 2m")])
def test_the_unit_tests_catch_a_changed_rule(tmp_path, mistake):
    text = ALERTS.read_text()
    assert mistake[0] in text
    (tmp_path / "alerts.yml").write_text(text.replace(mistake[0], mistake[1], 1))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    done = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert done.returncode != 0, f"changing {mistake[0]!r} to {mistake[1]!r} went unnoticed"


# -- dashboard ---------------------------------------------------------------------------------------


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def test_dashboard_loads_and_covers_each_subsystem():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "fleetmesh-fleet" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Membership", "Distribution", "Inference", "Decisions and guard", "Rollouts",
                    "Identity and builds"]
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']} queries nothing"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables, \
                    f"panel {panel['title']} uses ${var}, which the dashboard does not define"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool has no query checker without a server; a recording rule per query is checked the same way."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr}
             for i, (_, expr) in enumerate(dashboard_exprs())]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(tmp_path / "queries.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


# -- references and the running node ---------------------------------------------------------


def referenced_metrics() -> dict[str, set[tuple[str, str]]]:
    """Metric name -> {(where, expression)} for every query in alerts.yml and the dashboard."""
    queries = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    queries += [(f"panel {title}", expr) for title, expr in dashboard_exprs()]
    found: dict[str, set[tuple[str, str]]] = {}
    for where, expr in queries:
        for name in re.findall(r"\b(fleetmesh_[a-z0-9_]+|up)\b(?!\s*\()", expr):
            found.setdefault(name, set()).add((where, expr))
    return found


def registry_sample_names(registry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
        names |= {s.name for s in family.samples if not s.name.endswith("_created")}
    return names


async def running_node_metrics(cluster) -> set[str]:
    """Sample names a started node's registry serves, with every optional part configured (inference,
    a one-member site group that elects itself), so each subsystem's metrics can be there."""
    c = await cluster(1, inference={"model": "none-yet", "workers": 1},
                      raft=RaftSection(members=["node-00"]))
    node = next(iter(c.nodes.values()))
    await node.group.raft.wait_for_leader(30.0)
    return registry_sample_names(node.metrics.registry)


@pytest.mark.asyncio
async def test_alerts_and_dashboard_use_only_known_metrics(cluster):
    known = set().union(*(e.sample_names() for e in catalogue().values()))
    known |= await running_node_metrics(cluster) | PROMETHEUS_SERIES
    unknown = {name: sorted(w for w, _ in uses)
               for name, uses in referenced_metrics().items() if name not in known}
    assert not unknown, f"not in METRICS.md nor served by a node: {unknown}"
    assert len(referenced_metrics()) > 30


def test_reference_check_catches_an_unknown_name():
    known = set().union(*(e.sample_names() for e in catalogue().values()))
    assert "fleetmesh_inference_latency_seconds_bucket" in known
    assert "fleetmesh_inference_latency_seconds_bukket" not in known
    assert set(re.findall(r"\b(fleetmesh_[a-z0-9_]+|up)\b(?!\s*\()",
                          'sum(rate(fleetmesh_x_total{a="b"}[5m])) / up')) == {"fleetmesh_x_total", "up"}


def test_selector_labels_are_the_metrics_own():
    """`metric{label=...}` in a query names a label the catalogue gives that metric."""
    entries = catalogue()
    by_sample = {s: e for e in entries.values() for s in e.sample_names()}
    for uses in referenced_metrics().values():
        for where, expr in uses:
            for name, matchers in re.findall(r"\b(fleetmesh_[a-z0-9_]+)\{([^}]*)\}", expr):
                entry = by_sample.get(name)
                if entry is None:
                    continue
                for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                    assert label in entry.labels | TARGET_LABELS | {"le"}, \
                        f"{where}: {name} has no label {label} (METRICS.md: {sorted(entry.labels)})"


@pytest.mark.asyncio
async def test_metrics_exported_today_are_served_by_a_node(cluster):
    served = await running_node_metrics(cluster)
    exported = [e for e in catalogue().values() if e.status == "exported"]
    assert exported
    missing = [e.name for e in exported if not e.sample_names() <= served]
    assert not missing, f"METRICS.md says exported, a node does not serve: {missing}"
    planned_but_served = [e.name for e in catalogue().values() if e.status == "planned" and
                          e.sample_names() <= served]
    assert not planned_but_served, f"served already: mark these exported in METRICS.md: {planned_but_served}"


# Rows whose counters belong to a change still under way elsewhere; each says whose. Once a node
# serves one, test_metrics_exported_today_are_served_by_a_node asks to mark it exported and the
# test below to take it off this list.
AWAITING: dict[str, str] = {}


def is_rollout(entry: CatalogueEntry) -> bool:
    return entry.name.startswith("fleetmesh_rollout_")


@pytest.mark.asyncio
async def test_every_catalogued_metric_is_served_by_a_running_node(cluster):
    """Every metric METRICS.md lists is served, but rollouts' (all of them once any is: the rollout
    wiring is another change) and those AWAITING another change."""
    served = await running_node_metrics(cluster)
    entries = catalogue().values()
    missing = sorted(e.name for e in entries if not is_rollout(e) and e.name not in AWAITING
                     and not e.sample_names() <= served)
    assert not missing, f"METRICS.md lists metrics a running node does not serve: {missing}"
    arrived = sorted(name for name in AWAITING if catalogue()[name].sample_names() <= served)
    assert not arrived, f"served now: take these off AWAITING: {arrived}"
    rollouts = [e for e in entries if is_rollout(e)]
    assert len(rollouts) >= 4
    unserved = sorted(e.name for e in rollouts if not e.sample_names() <= served)
    assert len(unserved) in (0, len(rollouts)), f"a node serves only some rollout metrics: missing {unserved}"


@needs_promtool
def test_prometheus_config_example_passes_promtool(tmp_path):
    """Debian's promtool is built without Kubernetes discovery, so the pods job is checked by
    shape here and the rest of the file by promtool."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job in jobs.values():
        assert {"target_label": "job", "replacement": "fleetmesh"} in job["relabel_configs"], \
            f"{job['job_name']} must label its targets job=fleetmesh, as the alert rules expect"
    pods = jobs.pop("fleetmesh-pods")
    assert pods["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["fleetmesh"]}}]
    config["scrape_configs"] = list(jobs.values())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
