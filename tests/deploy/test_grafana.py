"""deploy/grafana: the provisioned data source, dashboard provider and line dashboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, REPO, load_yaml
from tests.deploy.promql import (
    PromQLNameError,
    exported_names,
    label_values_metric,
    metric_names,
    unknown_names,
)

GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def _dashboard(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if "expr" in t]


def _datasource_uid() -> str:
    sources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (prometheus,) = [d for d in sources["datasources"] if d["type"] == "prometheus"]
    uid: str = prometheus["uid"]
    return uid


def test_there_is_a_line_dashboard() -> None:
    assert [p.name for p in DASHBOARDS] == ["linewatch-line.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_names_a_metric_linewatch_exports(path: Path) -> None:
    dashboard = _dashboard(path)
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    exported = exported_names()
    assert unknown_names(exprs, exported) == {}
    assert all(metric_names(e) for e in exprs), "a query that selects no metric"
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        metric, _label = label_values_metric(query)
        assert metric in exported, f"variable {var['name']}: {metric} is not exported"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_covers_the_line_and_its_cameras(path: Path) -> None:
    """States, throughput, belt speed, latency, fps and drops per camera, provider."""
    used = set().union(*(metric_names(e) for e in dashboard_exprs(_dashboard(path))))
    for metric in (
        "linewatch_line_state", "linewatch_parts_counted_total",
        "linewatch_belt_speed_meters_per_second", "linewatch_capture_to_publish_seconds_bucket",
        "linewatch_camera_fps", "linewatch_frames_dropped_total",
        "linewatch_inference_provider", "linewatch_camera_up",
    ):
        assert metric in used, f"no panel shows {metric}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_use_the_provisioned_datasource_and_unique_ids(path: Path) -> None:
    dashboard = _dashboard(path)
    uid = _datasource_uid()
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
    assert dashboard["uid"] and dashboard["title"]


def test_the_dashboard_provider_points_where_compose_mounts_the_dashboards() -> None:
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "linewatch.yml")
    (entry,) = provider["providers"]
    compose = load_yaml(REPO / "docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == entry["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_metric_name_parser_finds_names_and_rejects_unknown_functions() -> None:
    expr = ('histogram_quantile(0.99, sum by (camera, le) (rate(a_bucket{x=~"$v", y="b c"}'
            '[$__rate_interval]))) / ignoring(q) group_left(r) b_total offset 5m > 1e-3')
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names("sum without (x) (up) and on(i) vector(1)") == {"up"}
    with pytest.raises(PromQLNameError):
        metric_names("rtae(a_total[5m])")
