"""The README's results section is exactly what the committed default study produced."""

from pathlib import Path

import pytest

from hdlib.config import load_config
from hdlib.stages.report import README_END, README_START, readme_block

ROOT = Path(__file__).resolve().parent.parent


def test_readme_results_match_committed_default_study(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "params/default.yaml")
    if not (ROOT / cfg.results_dir / "metrics" / "05_downstream.json").exists():
        pytest.skip("results/default has not been produced yet")
    text = (ROOT / "README.md").read_text()
    block = text[text.index(README_START):text.index(README_END) + len(README_END)]
    assert block == readme_block(cfg), "README results are stale: run `python -m hdlib readme params/default.yaml`"
