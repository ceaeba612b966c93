"""``linewatch model inspect``: what the service reads from a model file, and its adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.errors import ModelError
from service.inference.adapters import registered_adapters, select_adapter
from service.inference.metadata import read_model_info


def inspect_model(path: str | Path) -> dict[str, Any]:
    """Model info plus the adapter it would use and why (or why none accepts it).

    A model no adapter accepts is still described (``adapter`` is null and
    ``refusal`` holds the message the service would give at load).
    """
    info = read_model_info(path)
    report = info.to_dict()
    verdicts = [
        {"adapter": cls.name, "accepted": v.accepted, "reason": v.reason}
        for cls in registered_adapters()
        for v in [cls.accepts(info)]
    ]
    try:
        choice = select_adapter(info)
    except ModelError as exc:
        report.update(adapter=None, adapter_reason=None, refusal=str(exc), adapters=verdicts)
        return report
    report.update(
        adapter=choice.adapter.name, adapter_reason=choice.reason, refusal=None, adapters=verdicts
    )
    return report


def render_inspection(report: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_model`'s report."""
    lines = [f"model: {report['path']}"]
    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        for t in report[kind]:
            dims = ", ".join("?" if d is None else str(d) for d in t["shape"])
            lines.append(f"  {t['name']}  {t['dtype']}  [{dims}]")
    lines.append("metadata:")
    for key, value in sorted(report["metadata"].items()):
        text = value if len(value) <= 100 else value[:97] + "..."
        lines.append(f"  {key} = {text}")
    inp = report["input"]
    lines.append(
        f"input: {inp['width']}x{inp['height']} {inp['layout']} {inp['dtype']} {inp['color']}, "
        f"normalization {inp['normalization']}, resize {inp['resize']}, "
        f"{'dynamic' if report['dynamic_batch'] else 'fixed'} batch"
    )
    if report["defaulted"]:
        lines.append(f"  (not in metadata, defaulted: {', '.join(report['defaulted'])})")
    lines.append("classes:")
    for c in report["classes"]:
        lines.append(f"  {c['id']}: {c['name']}  keypoints: {', '.join(c['keypoint_names'])}")
    if report["adapter"]:
        lines.append(f"adapter: {report['adapter']} ({report['adapter_reason']})")
    else:
        lines.append(f"adapter: none. {report['refusal']}")
    return "\n".join(lines)
