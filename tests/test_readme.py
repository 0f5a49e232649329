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


def test_readme_shipped_model_figures_come_from_its_card():
    """The README's figures about models/demo-pool are the ones its card.json holds (rounded as printed)."""
    import json

    card = json.loads((ROOT / "models" / "demo-pool" / "card.json").read_text())
    text = " ".join((ROOT / "README.md").read_text().split())
    first = card["comparison_with_in_study_pretraining"]
    pj = card["pool_judge"]
    seeds = [v for k, v in pj["models"].items() if k.startswith("in_study")]
    shipped = pj["models"]["shipped"]
    random_fids = [v["random_judge_fid"] for v in seeds]
    kept = shipped["autoencoder_ceiling"]["tissue_kept_per_group"]
    before = card["previous_version"]["pool_judge"]["autoencoder_ceiling"]["tissue_kept_per_group"]
    closest = min(v["matched_size"]["mean"] for v in seeds) - shipped["matched_size"]["mean"]
    for claim in (f"{pj['judge']['holdout_accuracy']:.0%} right on held-out tiles",
                  f"shipped model at FID {shipped['fid']:.0f}",
                  ", ".join(f"{v['fid']:.0f}" for v in seeds[:-1]) + f" and {seeds[-1]['fid']:.0f}",
                  f"margin ({closest:.2f} at equal sample sizes)",
                  f"{min(random_fids):.2f} to {max(random_fids):.2f}",
                  f"shipped model {first['shipped']['fid']:.2f} vs {first['in_study']['fid']:.2f} for seed 0",
                  f"{before['LYM']:.0%} and {before['ADI']:.0%} of held-out LYM and ADI",
                  f"{kept['LYM']:.0%} and {kept['ADI']:.0%} of held-out LYM and ADI"):
        assert claim in text, f"README does not say {claim!r} (models/demo-pool/card.json)"
