"""A pre-training run outlives its machine: its latest checkpoint and curves are mirrored into a
committed folder, and a fresh clone resumes from there; EDM's log-normal noise levels on the schedule."""

import json

import pandas as pd
import pytest
import torch

from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.models.diffusion import (
    draw_noise_and_timesteps,
    make_noise_scheduler,
    timestep_probabilities,
)
from hdlib.paths import StudyPaths
from hdlib.pretrain.recipe import check_run_recipe
from hdlib.pretrain.resume import (
    keep_committed_checkpoint,
    seed_from_committed_checkpoint,
)


def _run(tmp_path, name, extra=()):
    cfg = load_config("params/smoke.yaml", [f"study.results_root={tmp_path}", f"study.name={name}",
                                            f"pretrain.committed_run={tmp_path / 'committed'}", *extra])
    check_run_recipe(cfg)
    return cfg


def _checkpoint(cfg, step, payload="w"):
    d = StudyPaths(cfg).model("denoiser_pretrained") / "checkpoints" / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_text(f"{payload}{step}")
    (d / "COMPLETE").write_text(f"{step}\n")


def test_a_fresh_clone_resumes_from_the_committed_checkpoint(tmp_path):
    first = _run(tmp_path, "machine_a")
    _checkpoint(first, 250)
    _checkpoint(first, 500)
    StudyPaths(first).metrics_dir.mkdir(parents=True, exist_ok=True)
    (StudyPaths(first).metrics_dir / "pretrain_eval.csv").write_text("step,fid\n500,80.0\n")
    mirrored = keep_committed_checkpoint(first)
    assert mirrored.name == "step-00000500"
    assert [p.name for p in (tmp_path / "committed" / "checkpoint").iterdir()] == ["step-00000500"]
    assert (tmp_path / "committed" / "curve.png").exists()  # the curve is redrawn beside it

    second = _run(tmp_path, "machine_b")  # the same recipe in an empty folder
    assert seed_from_committed_checkpoint(second) == 500
    ck = StudyPaths(second).model("denoiser_pretrained") / "checkpoints" / "step-00000500"
    assert (ck / "model.safetensors").read_text() == "w500" and (ck / "COMPLETE").exists()
    assert (StudyPaths(second).metrics_dir / "pretrain_eval.csv").read_text().endswith("500,80.0\n")
    assert seed_from_committed_checkpoint(second) == 0  # already as far: nothing copied again


def test_a_committed_run_of_another_recipe_is_a_one_line_error(tmp_path):
    first = _run(tmp_path, "a")
    _checkpoint(first, 10)
    keep_committed_checkpoint(first)
    other = _run(tmp_path, "b", ["diffusion.prediction_type=v_prediction"])
    with pytest.raises(ConfigError, match="another recipe"):
        seed_from_committed_checkpoint(other)
    assert json.loads((tmp_path / "committed" / "run_key.json").read_text())["diffusion"]["prediction_type"] == "epsilon"


def test_lognormal_timesteps_follow_edm_noise_levels():
    sched = make_noise_scheduler("paper")
    assert timestep_probabilities(sched, "uniform") is None
    p = timestep_probabilities(sched, "lognormal", mean=-0.5, std=1.2)
    assert p.shape == (1000,) and abs(float(p.sum()) - 1) < 1e-5 and (p >= 0).all()
    abar = sched.alphas_cumprod.double()
    sigma = ((1 - abar) / abar).sqrt()
    median_t = int(torch.searchsorted(p.double().cumsum(0), torch.tensor(0.5, dtype=torch.float64)))
    assert abs(float(sigma[median_t].log()) - (-0.5)) < 0.05  # half the mass below ln(sigma) = mean
    _, t1 = draw_noise_and_timesteps(torch.arange(4000), (1, 1, 1), 1000, p)
    _, t2 = draw_noise_and_timesteps(torch.arange(4000), (1, 1, 1), 1000, p)
    assert torch.equal(t1, t2)  # per-sample seeds: reproducible
    assert abs(float((sigma[t1].log() < -0.5).double().mean()) - 0.5) < 0.05
    _, tu = draw_noise_and_timesteps(torch.arange(8), (1, 1, 1), 1000)
    _, tu2 = draw_noise_and_timesteps(torch.arange(8), (1, 1, 1), 1000, None)
    assert torch.equal(tu, tu2)


def test_a_long_run_is_scored_by_its_committed_judge_on_every_machine(tmp_path, monkeypatch):
    """A judge retrained on another CPU scores on another scale: the committed run's judge, when its key
    matches, is used instead of training one; each curve row names the judge's weights."""
    from hdlib.evaluation.pool_judge import JudgeTraining, PoolJudge, save_judge
    from hdlib.models.pretrained import _sha256
    from hdlib.paths import StudyPaths
    from hdlib.pretrain import judges

    committed = tmp_path / "committed"
    cfg = load_config("params/smoke.yaml", [f"study.results_root={tmp_path / 'results'}",
                                            f"pretrain.committed_run={committed}"])
    manifest = StudyPaths(cfg).manifest("pool")
    manifest.parent.mkdir(parents=True)
    manifest.write_text("path,label\nx.png,0\n")
    key = {"pool_manifest_sha256": _sha256(manifest), "training": vars(JudgeTraining(epochs=cfg.pretrain.judge_epochs))}
    save_judge(PoolJudge(["a", "b"]), committed / judges.POOL_JUDGE_DIR, {"key": key})
    monkeypatch.setattr(judges, "train_pool_judge", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    judge, info = judges.pool_judge(cfg)
    assert judge.classes == ["a", "b"] and info["key"] == key
    manifest.write_text("path,label\nx.png,1\n")  # a pixel rendered differently on another CPU: still used
    assert judges.pool_judge(cfg)[0].classes == ["a", "b"]
    assert judges.judge_id(cfg) == _sha256(committed / judges.POOL_JUDGE_DIR / "judge.safetensors")[:12]


def test_a_cool_down_branch_starts_from_the_trunk_checkpoint_at_its_step(tmp_path):
    from hdlib.pretrain.cooldown import branch_name, seed_branch

    cfg = _run(tmp_path, "trunk")
    _checkpoint(cfg, 250)
    _checkpoint(cfg, 500)
    out = seed_branch(cfg, 250, 100)
    assert out == StudyPaths(cfg).model(branch_name(250, 100))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000250"]
    assert (out / "checkpoints" / "step-00000250" / "model.safetensors").read_text() == "w250"
    (out / "checkpoints" / "step-00000300").mkdir()  # the branch has gone on: it resumes, nothing is copied
    (out / "checkpoints" / "step-00000300" / "COMPLETE").write_text("300\n")
    assert seed_branch(cfg, 250, 100) == out and not (out / "checkpoints" / "step-00000250" / "x").exists()
    with pytest.raises(ConfigError, match=r"--from-step 400: .*\[250, 500\]"):
        seed_branch(cfg, 400, 100)


def _variant(tmp_path, name="machine_a", layers=2):
    from hdlib.pretrain.variant import variant_config

    return variant_config("params/smoke.yaml", [
        f"study.results_root={tmp_path}", f"study.name={name}", f"pretrain.committed_run={tmp_path / 'committed'}",
        f'pretrain.long_variants=["deep: diffusion.layers_per_block={layers}"]'], "deep")


def test_a_long_variant_is_declared_in_the_params(tmp_path):
    from hdlib.pretrain.variant import variant_config

    cfg, vcfg, ov = _variant(tmp_path)
    assert (cfg.diffusion.layers_per_block, vcfg.diffusion.layers_per_block) == (1, 2)
    assert ov == ["diffusion.layers_per_block=2"]
    with pytest.raises(ConfigError, match=r"no variant 'wide' .*declared: deep"):
        variant_config("params/smoke.yaml", ['pretrain.long_variants=["deep: diffusion.layers_per_block=2"]'], "wide")


def test_a_long_variant_resumes_on_a_fresh_clone_from_its_committed_checkpoint(tmp_path):
    from hdlib.pretrain.variant import CURVE, keep_committed_variant, seed_variant, variant_dir

    cfg, vcfg, _ = _variant(tmp_path)
    for step in (1000, 2000):
        d = variant_dir(cfg, "deep") / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_text(f"v{step}")
        (d / "COMPLETE").write_text(f"{step}\n")
    StudyPaths(cfg).metrics_dir.mkdir(parents=True, exist_ok=True)
    (StudyPaths(cfg).metrics_dir / CURVE).write_text("variant,step,fid\ndeep,2000,70.0\n")
    (variant_dir(cfg, "deep") / "log.csv").write_text("step,loss\n2000,0.5\n")
    keep_committed_variant(cfg, vcfg, "deep")
    root = tmp_path / "committed" / "variants" / "deep"
    assert [p.name for p in (root / "checkpoint").iterdir()] == ["step-00002000"]
    assert (tmp_path / "committed" / "metrics" / CURVE).read_text().endswith("deep,2000,70.0\n")

    cfg_b, vcfg_b, _ = _variant(tmp_path, "machine_b")
    assert seed_variant(cfg_b, vcfg_b, "deep") == 2000
    assert (variant_dir(cfg_b, "deep") / "checkpoints" / "step-00002000" / "model.safetensors").read_text() == "v2000"
    assert (variant_dir(cfg_b, "deep") / "log.csv").read_text() == "step,loss\n2000,0.5\n"  # its loss curve too
    assert seed_variant(cfg_b, vcfg_b, "deep") == 0  # as far already
    cfg_c, vcfg_c, _ = _variant(tmp_path, "machine_c", layers=3)  # the same name, another recipe
    with pytest.raises(ConfigError, match="another recipe"):
        seed_variant(cfg_c, vcfg_c, "deep")


def test_a_cool_down_of_a_long_variant_starts_from_the_variants_checkpoint(tmp_path):
    from hdlib.pretrain.cooldown import seed_branch
    from hdlib.pretrain.recipe import branch_name, branch_variant
    from hdlib.pretrain.variant import variant_dir

    cfg, _, _ = _variant(tmp_path)
    _checkpoint(cfg, 250)  # the trunk's, at the same step: not the one to branch from
    d = variant_dir(cfg, "deep") / "checkpoints" / "step-00000250"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_text("deep250")
    (d / "COMPLETE").write_text("250\n")
    out = seed_branch(cfg, 250, 100, "deep")
    assert out == StudyPaths(cfg).model(branch_name(250, 100, "deep")) != StudyPaths(cfg).model(branch_name(250, 100))
    assert (out / "checkpoints" / "step-00000250" / "model.safetensors").read_text() == "deep250"
    with pytest.raises(ConfigError, match=r"--from-step 500: the variant has no checkpoint"):
        seed_branch(cfg, 500, 100, "deep")
    assert [branch_variant(r) for r in ({"variant": "deep"}, {"variant": float("nan")}, {})] == ["deep", "", ""]


def test_a_variants_cool_down_is_drawn_as_its_own_line_and_not_as_the_trunks():
    from hdlib.pretrain.curve import with_variant_branches

    variants = pd.DataFrame({"variant": ["deep"] * 2, "step": [1000, 2000], "fid": [90.0, 80.0]})
    branches = pd.DataFrame({"variant": ["deep"], "from_step": [2000], "cooldown_steps": [500], "step": [2500],
                             "fid": [70.0]})
    out = with_variant_branches(variants, branches)
    line = out[out["variant"] == "deep 2000+500"]
    assert list(line["step"]) == [2000, 2500] and list(line["fid"]) == [80.0, 70.0]
    assert list(out[out["variant"] == "deep"]["fid"]) == [90.0, 80.0]


def test_branch_rows_judged_on_another_machine_survive_a_fresh_clone(tmp_path):
    """Found when a cool-down on a fresh study folder mirrored its one row over the committed branch rows."""
    from hdlib.pretrain.recipe import COOLDOWN_CURVE
    from hdlib.pretrain.resume import committed_rows

    cfg = _run(tmp_path, "fresh")
    (tmp_path / "committed" / "metrics").mkdir(parents=True)
    (tmp_path / "committed" / "metrics" / COOLDOWN_CURVE).write_text("from_step,cooldown_steps,step,fid\n4000,1000,5000,76.8\n")
    path = committed_rows(cfg, COOLDOWN_CURVE)
    assert path == StudyPaths(cfg).metrics_dir / COOLDOWN_CURVE and path.read_text().endswith("4000,1000,5000,76.8\n")
    path.write_text("from_step,cooldown_steps,step,fid\n4000,1000,5000,76.8\n7000,1000,8000,82.1\n")
    assert committed_rows(cfg, COOLDOWN_CURVE).read_text().endswith("82.1\n")  # the folder's own rows are kept


def test_sampler_settings_already_scored_for_this_model_are_skipped():
    from hdlib.pretrain.sampler_steps import todo

    rows = [{"pin": "abc", "ddim_steps": 25, "eta": 1.0}, {"pin": "other", "ddim_steps": 50, "eta": 1.0}]
    assert todo(rows, "abc", [25, 50], [1.0, 0.0]) == [(25, 0.0), (50, 1.0), (50, 0.0)]
    assert todo(rows, "abc", [25], [1]) == []
