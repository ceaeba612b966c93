"""Every YAML example in docs/models.md is a config that the real loader accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.config import check_config, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "models.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
SHARED = ROOT.parent / "shared"


def test_the_doc_has_an_example_per_family() -> None:
    kinds = set()
    for text in BLOCKS:
        for mod in yaml.safe_load(text).get("models", []):
            adapter = mod.get("adapter", "auto")
            kinds.add(adapter if isinstance(adapter, str) else adapter.get("kind", "auto"))
    assert kinds == {"auto", "end2end", "ultralytics", "simcc", "heatmap", "regression"}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_models_yaml_example_passes_config_check(index: int, tmp_path: Path) -> None:
    """Checked as if saved in the repository root: the paths that exist there (the shipped
    model, ../shared/data) are read, and a forced adapter is checked against them."""
    work = tmp_path / "repo"
    work.mkdir()
    (work / "models").symlink_to(ROOT / "models")
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED)
    path = work / "example.yaml"
    path.write_text(BLOCKS[index], encoding="utf-8")
    models = yaml.safe_load(BLOCKS[index])["models"]
    files = [resolve_model_path(m["path"], work) for m in models]
    report = check_config(path, env={}, check_files=all(f.is_file() for f in files))
    assert report.ok, "\n".join(str(i) for i in report.issues)
    assert report.config is not None and report.config.models
