"""The whole smoke study (params/smoke.yaml) through papermill, as a user would run it."""

import json
from pathlib import Path

import pandas as pd
import torch
import pytest

from hdlib.config import load_config
from hdlib.stages.report import accuracy_table
from hdlib.runner import run_study

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"
STAGES = ["00_data", "01_autoencoder", "02_diffusion", "03_guidance", "04_synthesis", "05_downstream",
          "06_quality", "07_report"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    overrides = [f"study.results_root={root / 'results'}", f"study.data_root={root / 'data'}"]
    status = run_study(SMOKE, overrides, log=print)
    cfg = load_config(SMOKE, overrides)
    return cfg, overrides, status


@pytest.mark.slow
def test_every_stage_ran_and_wrote_outputs(study):
    cfg, _, status = study
    out = cfg.results_dir
    assert status == {s: "ran" for s in STAGES}
    for s in STAGES:
        assert (out / f"{s}.ipynb").exists(), s
    for s in ["00_data", "01_autoencoder", "02_diffusion", "03_guidance", "04_synthesis", "05_downstream",
              "06_quality"]:
        assert (out / "metrics" / f"{s}.json").exists(), s
    for fig in ["data_target_per_class", "autoencoder_reconstructions", "diffusion_samples",
                "latent_classifier_accuracy_by_t", "synthesis_comparison_grid", "guidance_sweep",
                "downstream_accuracy_vs_fraction", "quality_fid"]:
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["data_manifests_sha1"] and set(prov["stage_seconds"]) == set(STAGES)


@pytest.mark.slow
def test_report_tables_match_metrics(study):
    cfg, _, _ = study
    out = cfg.results_dir
    metrics = json.loads((out / "metrics" / "05_downstream.json").read_text())
    report = (out / "REPORT.md").read_text()
    table = accuracy_table(metrics["accuracy"])
    for _, row in table.iterrows():
        for col in table.columns[1:]:
            if isinstance(row[col], str):
                assert row[col] in report
    raw = pd.read_csv(out / "tables" / "downstream_grid_raw.csv")
    real0 = raw[(raw.training_set == "real") & (raw.fraction == min(cfg.downstream.fractions))]["test.accuracy"]
    rec = [r for r in metrics["accuracy"] if r["training_set"] == "real" and r["fraction"] == min(cfg.downstream.fractions)][0]
    assert rec["mean"] == pytest.approx(real0.mean()) and rec["n"] == len(real0)


@pytest.mark.slow
def test_rerun_skips_everything_and_grid_resumes(study):
    cfg, overrides, _ = study
    assert set(run_study(SMOKE, overrides, log=print).values()) == {"skipped"}
    grid = cfg.results_dir / "grid"
    cells = sorted(grid.glob("*.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in cells}
    victim = cells[0]
    victim.unlink()  # as if the grid had been killed before this cell finished
    assert run_study(SMOKE, overrides, only="05", log=print) == {"05_downstream": "ran"}
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items() if p != victim)


@pytest.mark.slow
def test_target_never_in_pool(study):
    cfg, _, _ = study
    man = cfg.results_dir / "manifests"
    pool = pd.read_csv(man / "pool.csv")
    target = pd.concat([pd.read_csv(man / f"target_{s}.csv") for s in ("train", "val", "test")])
    assert not set(pool["sha1"]) & set(target["sha1"])
    assert set(pool["source"]) <= {s.name for s in cfg.data.pool_sources}


@pytest.mark.slow
def test_target_absent_from_every_pretraining_batch(study):
    """Every batch the autoencoder and the pre-training denoiser can draw comes from the
    pool tensors; none of their rows equals a target image (or its latent)."""
    from hdlib.stages.autoencoder import load_latents
    from hdlib.stages.data import load_target
    from hdlib.train import build_task

    cfg, _, _ = study
    target = load_target(cfg)
    tgt = torch.cat([target["train_images"], target["val_images"], target["test_images"]]).flatten(1)
    ae = build_task(cfg, "autoencoder")
    pool_imgs = ((ae.tensors[0] + 1) * 127.5).round().to(torch.uint8).flatten(1)
    assert len(ae.tensors) == 1 and len(pool_imgs) == cfg.data.pool_size
    assert not any((tgt == row).all(1).any() for row in pool_imgs)
    lat = load_latents(cfg)
    pre = build_task(cfg, "denoiser_pretrained")
    assert len(pre.tensors) == 1 and torch.equal(pre.tensors[0], lat["pool"])
    tz = torch.cat([lat["train"], lat["val"], lat["test"]]).flatten(1)
    assert torch.cdist(pre.tensors[0].flatten(1), tz).min() > 0


@pytest.mark.slow
def test_sharded_sampling_on_two_processes_matches_one(study):
    """Synthesis split over 2 processes (the launcher, gloo on the CPU) gives the images of
    a 1-process run: each image has its own seed, whatever its shard."""
    from hdlib.stages.common import config_from_results
    from hdlib.stages.synthesis import Generation, _synthesize_sharded, request_seeds

    cfg, _, _ = study
    two = config_from_results(cfg.results_dir)
    two.study.num_processes = 2
    f = min(cfg.downstream.fractions)
    z2, _ = _synthesize_sharded(two, "histodiffusion", f, 2, "shard_check", None)
    labels = torch.arange(len(cfg.data.classes)).repeat_interleave(2)
    seeds = torch.as_tensor(request_seeds(two, "shard_check", len(labels)))
    z1 = Generation(config_from_results(cfg.results_dir)).latents("histodiffusion", f, labels, seeds, progress=False)
    # batch composition differs between the runs, so agreement is to float tolerance, not bitwise
    assert torch.allclose(z1, z2, rtol=1e-4, atol=1e-4 * z1.abs().max().item())


@pytest.mark.slow
def test_changed_synthetic_set_reruns_exactly_its_grid_cells(study, tmp_path):
    """Grid cells are keyed by the content of their inputs: replace one upstream synthetic
    set (as a re-run of stage 04 with other weights would) and only the cells trained on
    it are recomputed; every other cell is reused untouched."""
    import shutil

    from hdlib.paths import synthetic_set_name
    from hdlib.stages.downstream import run_downstream_grid

    cfg, overrides, _ = study
    copy = tmp_path / "results"
    shutil.copytree(cfg.results_dir, copy / cfg.study.name)
    mine = load_config(SMOKE, overrides + [f"study.results_root={copy}"])
    mine.study.progress = False
    first = run_downstream_grid(mine)
    assert first.attrs["computed"] == [] and first.attrs["stale_recomputed"] == []

    f = min(cfg.downstream.fractions)
    blob_path = copy / cfg.study.name / "synthetic" / synthetic_set_name("histodiffusion", f) / "images.pt"
    blob = torch.load(blob_path, weights_only=False)
    blob["images"] = 255 - blob["images"]
    blob["content_key"] = blob["content_key"] + "-regenerated"
    torch.save(blob, blob_path)
    grid = copy / cfg.study.name / "grid"
    mtimes = {p.name: p.stat().st_mtime_ns for p in grid.glob("*.json")}

    second = run_downstream_grid(mine)
    expected = sorted(second.loc[(second["fraction"] == f) & second["training_set"].isin(
        ["histodiffusion", "histodiffusion_unfiltered"]), "id"].unique())
    assert expected and sorted(second.attrs["stale_recomputed"]) == expected
    assert sorted(second.attrs["computed"]) == expected
    for p in grid.glob("*.json"):
        if p.stem not in expected:
            assert p.stat().st_mtime_ns == mtimes[p.name], p.name
