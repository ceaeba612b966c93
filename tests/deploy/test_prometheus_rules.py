"""deploy/prometheus: the alert rules, their promtool unit tests, the Prometheus and
Alertmanager configs."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY, REPO, alert_rules, load_yaml, output_of
from tests.deploy.promql import exported_names, unknown_names

PROM = DEPLOY / "prometheus"
RULES = PROM / "rules.yml"
UNIT_TESTS = sorted((PROM / "tests").glob("*.yml"))
# Runbooks are repository-relative links to a section of docs/operations.md (the
# section named after the alert), so they stay right in every fork and mirror.
RUNBOOK_BASE = "docs/operations.md#"

# What the issue asks alerts for, and the alert that covers it.
REQUIRED = {
    "camera down": "LineWatchCameraDown",
    "camera fps below expected": "LineWatchCameraFpsLow",
    "inference on the CPU when a GPU is expected": "LineWatchInferenceOnCpu",
    "capture-to-publish latency high": "LineWatchLatencyHigh",
    "frames dropped": "LineWatchFramesDropped",
    "line jammed": "LineWatchLineJammed",
    "line stopped": "LineWatchLineStopped",
    "part out of tolerance": "LineWatchPartOutOfTolerance",
    "throughput below target": "LineWatchThroughputLow",
    "line state stale (a stale camera makes it UNKNOWN)": "LineWatchLineStateUnknown",
    "line state stale (frames arrive, none is judged)": "LineWatchPipelineStalled",
}


def _alert_tests() -> dict[str, dict[str, int]]:
    """{alertname: {"fires": n, "quiet": n}} over every promtool unit test file."""
    seen: dict[str, dict[str, int]] = {}
    for path in UNIT_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                kind = "fires" if check.get("exp_alerts") else "quiet"
                counts = seen.setdefault(check["alertname"], {"fires": 0, "quiet": 0})
                counts[kind] += 1
    return seen


def test_promtool_check_rules(run_tool: Callable[..., Any]) -> None:
    proc = run_tool("promtool", "check", "rules", RULES)
    assert proc.returncode == 0, output_of(proc)
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_promtool_unit_tests_pass(run_tool: Callable[..., Any]) -> None:
    assert UNIT_TESTS, "no promtool unit tests in deploy/prometheus/tests"
    proc = run_tool("promtool", "test", "rules", *UNIT_TESTS)
    assert proc.returncode == 0, output_of(proc)


def test_promtool_unit_tests_catch_a_changed_rule(
    run_tool: Callable[..., Any], tmp_path: Path
) -> None:
    """The unit tests check behaviour: a copy of the rules with CameraDown's `for` made
    longer and LineFault's severity changed fails them."""
    rules = load_yaml(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "LineWatchCameraDown":
                rule["for"] = "10m"
            if rule.get("alert") == "LineWatchLineFault":
                rule["labels"]["severity"] = "warning"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    (tmp_path / "tests").mkdir()
    for path in UNIT_TESTS:
        shutil.copy(path, tmp_path / "tests" / path.name)
    proc = run_tool("promtool", "test", "rules", *sorted((tmp_path / "tests").glob("*.yml")))
    assert proc.returncode == 1, output_of(proc)
    assert "LineWatchCameraDown" in proc.stdout + proc.stderr
    assert "LineWatchLineFault" in proc.stdout + proc.stderr


def test_every_required_alert_exists() -> None:
    names = {r["alert"] for r in alert_rules()}
    missing = {need: alert for need, alert in REQUIRED.items() if alert not in names}
    assert not missing


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    seen = _alert_tests()
    for rule in alert_rules():
        counts = seen.get(rule["alert"], {"fires": 0, "quiet": 0})
        assert counts["fires"] >= 1, f"{rule['alert']}: no promtool test that fires it"
        assert counts["quiet"] >= 1, f"{rule['alert']}: no promtool test on healthy series"


def test_every_alert_has_summary_description_runbook_and_severity() -> None:
    for rule in alert_rules():
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key, "").strip(), f"{rule['alert']}: no {key}"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}
        assert ann["runbook_url"] == RUNBOOK_BASE + rule["alert"].lower()


def markdown_anchors(text: str) -> set[str]:
    """The anchors GitHub (and most Markdown renderers) make of the headings in ``text``."""
    return {
        re.sub(r"[^\w\- ]", "", m.group(1)).strip().lower().replace(" ", "-")
        for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)
    }


def test_every_runbook_is_a_section_of_operations_md() -> None:
    for rule in alert_rules():
        path, anchor = rule["annotations"]["runbook_url"].split("#", 1)
        doc = REPO / path
        assert doc.is_file(), f"{rule['alert']}: runbook {path} is not a file in the repo"
        assert anchor in markdown_anchors(doc.read_text(encoding="utf-8")), (
            f"{path} has no section '{rule['alert']}'"
        )


def test_alerts_use_only_metrics_linewatch_exports() -> None:
    allowed = exported_names() | {"up"}  # `up` is Prometheus' own scrape health
    assert unknown_names((r["expr"] for r in alert_rules()), allowed) == {}


def test_prometheus_config_is_valid_and_scrapes_linewatch(run_tool: Callable[..., Any]) -> None:
    config_path = PROM / "prometheus.yml"
    proc = run_tool("promtool", "check", "config", config_path)
    assert proc.returncode == 0, output_of(proc)
    config = load_yaml(config_path)
    assert config["rule_files"] == ["rules.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    names = jobs["linewatch"]["dns_sd_configs"][0]["names"]
    assert set(names) == {"linewatch", "linewatch-cpu"}  # the compose services
    relabel = {(r["regex"], r["replacement"]) for r in jobs["linewatch"]["relabel_configs"]
               if r.get("target_label") == "expect_gpu"}
    assert relabel == {("linewatch", "true"), ("linewatch-cpu", "false")}


def test_alertmanager_config_is_valid_and_inhibits_known_alerts(
    run_tool: Callable[..., Any],
) -> None:
    path = DEPLOY / "alertmanager" / "alertmanager.yml"
    proc = run_tool("amtool", "check-config", path)
    assert proc.returncode == 0, output_of(proc)
    names = {r["alert"] for r in alert_rules()}
    for inhibit in load_yaml(path)["inhibit_rules"]:
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            m = re.fullmatch(r'alertname(=~|=|!=)"?([^"]+)"?', matcher)
            assert m, matcher
            if m.group(1) == "=~":
                pattern = re.compile(m.group(2))
                assert any(pattern.fullmatch(n) for n in names), matcher
                continue
            assert m.group(2) in names, f"inhibit rule names unknown alert: {matcher}"
