"""``linewatch model inspect``: what the service reads from a model file, and its adapter.

With a config entry's ``adapter:`` settings it shows the forced adapter (or the one
``auto`` picks) and why, exactly as the service will load the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig
from service.inference.adapters import configured_adapter, registered_adapters
from service.inference.cpu_graph import cpu_rewrites_of, describe_rewrites
from service.inference.inputs import apply_input_override
from service.inference.metadata import ModelInfo, read_model_info


def inspect_model(
    path: str | Path, settings: AdapterConfig | None = None, source: str | None = None
) -> dict[str, Any]:
    """Model info plus the adapter it would use and why (or why none accepts it).

    ``settings`` (a config entry's ``adapter:`` section, ``source`` naming it) are
    applied as the service applies them: input overrides, then the forced adapter (or
    auto).  A model that is refused is still described (``adapter`` is null and
    ``refusal`` holds the message the service would give at load).
    """
    settings = settings or AdapterConfig()
    raw = read_model_info(path)
    report = raw.to_dict()
    forced = settings.kind != "auto"
    report.update(forced=forced, settings_from=source,
                  cpu_rewrites=cpu_rewrites_of(Path(path)))
    try:
        info, normalizer, choice = configured_adapter(raw, settings)
    except ModelError as exc:
        info = apply_input_override(raw, settings.input)[0]
        report.update(adapter=None, adapter_reason=None, refusal=str(exc),
                      adapters=_verdicts(info, settings))
        return report
    if source is not None:  # show the input and names as the config makes them
        adapter = choice.adapter(info, None, None, settings, normalizer)
        report["input"] = info.to_dict()["input"]
        report["classes"] = [
            {"id": i, "name": c.name, "keypoint_names": list(c.keypoint_names),
             "skeleton": [list(e) for e in c.skeleton]}
            for i, c in enumerate(adapter.classes())
        ]
    report.update(
        adapter=choice.adapter.name, adapter_reason=choice.reason, refusal=None,
        adapters=_verdicts(info, settings),
    )
    return report


def _verdicts(info: ModelInfo, settings: AdapterConfig) -> list[dict[str, Any]]:
    """Every adapter's verdict: from the file alone, or with the settings for a forced one."""
    out = []
    for cls in registered_adapters():
        v = cls.fits(info, settings) if cls.name == settings.kind else cls.accepts(info)
        out.append({"adapter": cls.name, "accepted": v.accepted, "reason": v.reason})
    return out


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
        names = ", ".join(c["keypoint_names"]) or "none (boxes only)"
        lines.append(f"  {c['id']}: {c['name']}  keypoints: {names}")
    if report.get("cpu_rewrites"):
        done = describe_rewrites(report["cpu_rewrites"])
        lines.append(f"on ONNX Runtime's CPU: graph rewrites {done} (cpu_rewrites: false "
                     "turns them off)")
    if report.get("settings_from"):
        lines.append(f"settings: {report['settings_from']}")
    if report["adapter"]:
        lines.append(f"adapter: {report['adapter']} ({report['adapter_reason']})")
    else:
        lines.append(f"adapter: none. {report['refusal']}")
    return "\n".join(lines)
