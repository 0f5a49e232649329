"""REPORT.md and the README block are rendered by jinja2 templates from the stage metrics alone: a section
whose metrics are absent leaves no trace, and the numbers they print are the metrics' own."""

import json
import shutil
from pathlib import Path

import pytest

from hdlib.config import load_config
from hdlib.stages.report import build_report
from hdlib.study import decisions

REPO_ROOT = Path(__file__).resolve().parent.parent


def _study(tmp_path, copy_from=None):
    cfg = load_config(REPO_ROOT / "params" / "default.yaml", [f"study.results_root={tmp_path}"])
    root = tmp_path / cfg.study.name
    if copy_from:
        shutil.copytree(copy_from, root)
    decisions.record(cfg, "primary_cell", {"fraction": 0.025, "labels_per_class": {"total": 4, "train": 3, "val": 1}})
    return cfg, root


def test_a_study_without_metrics_renders_every_heading_once_and_no_blank_runs(tmp_path):
    cfg, root = _study(tmp_path)
    text = build_report(cfg).read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Headline", "## The chain, link by link (primary cell; FID at the smallest fraction)",
                        "## Design of this run", "## Downstream accuracy", "## Synthesis: choice, accounting, filtering",
                        "## Generation quality", "## Generative core", "## Data", "## Timings"]
    assert "The downstream grid has not been run." in text
    assert "\n\n\n" not in text and "{{" not in text and "{%" not in text
    assert (root / "README_block.md").read_text().count("\n\n\n") == 0


def test_the_committed_default_study_reports_its_metrics_numbers(tmp_path):
    committed = REPO_ROOT / "results" / "default"
    if not (committed / "metrics" / "05_downstream.json").exists():
        pytest.skip("results/default has not been produced")
    cfg, root = _study(tmp_path, committed)
    text = build_report(cfg).read_text()
    d1 = json.loads((root / "metrics" / "01_autoencoder.json").read_text())
    d5 = json.loads((root / "metrics" / "05_downstream.json").read_text())
    assert f"held-out pool PSNR {d1['heldout_pool_psnr_db']:.2f} dB" in text
    assert f"{d5['vs_real']['mean_diff'] * 100:+.1f} points" in text
    for row in d5["accuracy"]:  # every cell of the headline table, as the table prints it
        assert f"{row['mean']:.3f} ± " in text
    block = (root / "README_block.md").read_text()
    assert f"scale factor {d1['scale_factor']:.4f}" in block and f"{d5['vs_real']['mean_diff'] * 100:+.1f} points" in block


def test_the_shifted_cohort_gets_its_own_section_with_its_numbers(tmp_path):
    committed = REPO_ROOT / "results" / "default"
    if not (committed / "metrics" / "05_downstream.json").exists():
        pytest.skip("results/default has not been produced")
    cfg, root = _study(tmp_path, committed)
    d5_path = root / "metrics" / "05_downstream.json"
    d5 = json.loads(d5_path.read_text())
    d5.pop("shifted_cohort", None)
    d5_path.write_text(json.dumps(d5))
    assert "shifted test cohort" not in build_report(cfg).read_text()  # none measured: no section
    comparison = {"mean_diff": 0.0412, "ci_low": 0.01, "ci_high": 0.07, "t_pvalue": 0.01, "n": 10, "mdd_points": 2.0,
                  "p_holm": 0.02}
    d5["shifted_cohort"] = {"all_labels_accuracy": 0.812, "accuracy": d5["accuracy"], "vs_real": comparison,
                            "vs_rival": None, "combined_vs_rival": None, "gain_vs_labels": []}
    d5_path.write_text(json.dumps(d5))
    text = build_report(cfg).read_text()
    section = text.split("### The shifted test cohort (secondary endpoint)")[1].split("\n## ")[0]
    assert "scores 0.812 there" in section and "HistoDiffusion - real-only +4.1 points" in section
    assert "Holm p 0.020" in section and section.count(" ± ") == text.split("## Downstream accuracy")[1].split(
        "Paired difference")[0].count(" ± ")  # the same table layout, the shifted cohort's cells


def test_a_committed_study_holds_only_metrics_a_stage_writes():
    """metrics/<stage>.json per notebook, nothing else: a file no stage writes any more (04_choice.json,
    left by older code, contradicted decisions/guidance.json) would be read as current."""
    root = Path(__file__).resolve().parent.parent
    stages = {p.stem for p in (root / "notebooks" / "src").glob("[0-9][0-9]_*.py")}
    for study in (root / "results" / name for name in ("default", "ablations", "ablations_random", "ablations_diverse")):
        stray = [p.name for p in (study / "metrics").iterdir() if p.suffix != ".json" or p.stem not in stages]
        assert stray == [], (study.name, stray)
