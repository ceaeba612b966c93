"""Write deploy/k8s/prometheusrule.yaml from deploy/prometheus/rules.yml.

The Prometheus Operator loads alert rules from PrometheusRule objects, not files; this
wraps the one rules file, so the two never drift (tests/deploy/test_k8s.py checks it).

    python deploy/k8s/render_prometheusrule.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "rules.yml"
OUT = HERE / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/rules.yml by deploy/k8s/render_prometheusrule.py;\n"
    "# do not edit (edit the rules file and run the script).\n"
)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule object holding ``rules`` (a parsed Prometheus rule file)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "linewatch",
            "namespace": "linewatch",
            "labels": {
                "app.kubernetes.io/name": "linewatch",
                "app.kubernetes.io/part-of": "linewatch",
                "release": "prometheus",
            },
        },
        "spec": {"groups": rules["groups"]},
    }


def render(rules_path: Path = RULES) -> str:
    rules = yaml.safe_load(rules_path.read_text(encoding="utf-8"))
    body = yaml.safe_dump(prometheus_rule(rules), sort_keys=False, width=100)
    return HEADER + body


def main() -> None:
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
