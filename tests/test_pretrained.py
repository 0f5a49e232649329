"""Pre-trained models in diffusers format: the shipped one loads with plain diffusers and
samples; external folders of any latent channels / downsampling work; mismatches and
pickled weights are one-line errors before any compute; export round-trips."""

import dataclasses
import json
from pathlib import Path
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel

from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.models.builders import autoencoder_downsampling, build_autoencoder
from hdlib.models.pretrained import (
    MANIFEST,
    check_compatible,
    check_init_vae,
    export_pretrained,
    folder_sha256,
    load_scheduler,
    load_unet,
    load_vae,
    read_latent_info,
    verify,
)
from hdlib.paths import StudyPaths
from hdlib.pretrain import (
    RUN_KEY,
    RandomResNetJudge,
    card_verdicts,
    check_run_recipe,
    config_with,
    judge_sensitivity,
    matched_size_fid,
    model_card_text,
    parse_other_run,
    train_autoencoder_tracked,
    update_card,
)
from hdlib.pretrain import main as pretrain_main
from hdlib.pretrain.card import VERDICTS, card_files, say
from hdlib.pretrain.verdicts import (
    comparison_verdict,
    pool_judge_verdict,
    sweep_verdict,
)
from hdlib.stages.report import pretrained_section
from hdlib.study.preparation import prepare_data
from hdlib.tools.runner import discover_stages, stage_fingerprints

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "demo-pool"
SMOKE = ROOT / "params" / "smoke.yaml"


def tiny_vae(latent_channels=3, levels=2):
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4)


def tiny_unet(channels=3, size=8):
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    return export_pretrained(tmp_path / "m", tiny_vae(), tiny_unet(), DDPMScheduler(num_train_timesteps=50),
                             scaling_factor=0.7)


def test_shipped_model_loads_with_plain_diffusers_and_samples():
    vae = AutoencoderKL.from_pretrained(SHIPPED / "vae", use_safetensors=True)
    unet = UNet2DModel.from_pretrained(SHIPPED / "unet", use_safetensors=True)
    sched = DDPMScheduler.from_pretrained(SHIPPED / "scheduler")
    assert unet.config.in_channels == vae.config.latent_channels
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    S = unet.config.sample_size
    z = torch.randn(2, unet.config.in_channels, S, S, generator=g)
    with torch.no_grad():
        for t in ddim.timesteps:
            z = ddim.step(unet(z, t).sample, t, z).prev_sample
        x = vae.decode(z / vae.config.scaling_factor).sample
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    assert x.shape == (2, 3, S * down, S * down)
    assert torch.isfinite(x).all() and x.std() > 0.01
    verify(SHIPPED)  # every file matches MANIFEST.sha256
    card = json.loads((SHIPPED / "card.json").read_text())
    assert card["quality_final"]["fid"] > 0 and (SHIPPED / "MODEL_CARD.md").exists()
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 40 * 2**20


def test_export_round_trips_and_is_safetensors(folder):
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "scheduler", "unet", "vae"]
    assert list((folder / "vae").glob("*.safetensors")) and not list(folder.rglob("*.bin"))
    assert read_latent_info(folder)["scaling_factor"] == pytest.approx(0.7)
    vae, unet = load_vae(folder), load_unet(folder)
    assert vae.config.latent_channels == 3 and unet.config.in_channels == 3
    assert load_scheduler(folder).config.num_train_timesteps == 50
    assert check_compatible(folder, 16) == {"latent_channels": 3, "downsampling": 2, "latent_size": 8,
                                            "has_unet": True}


def test_manifest_and_pinned_sha256_catch_a_changed_file(folder):
    pinned = verify(folder)
    assert pinned == folder_sha256(folder)
    w = next((folder / "unet").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ConfigError, match="unet/.*sha256 differs"):
        verify(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(ConfigError, match="expected"):
        verify(folder, pinned)


@pytest.mark.parametrize("image_size, unet, match", [
    (16, tiny_unet(channels=4), "4 input / 4 output channels but the vae's latents have 3"),
    (16, tiny_unet(size=4), "sample_size 4 does not match the latent size 8"),
    (15, tiny_unet(), "not divisible by the autoencoder's downsampling factor 2"),
])
def test_mismatch_is_one_line_error(tmp_path, image_size, unet, match):
    f = export_pretrained(tmp_path / "bad", tiny_vae(), unet, DDPMScheduler(num_train_timesteps=50), 1.0)
    with pytest.raises(ConfigError, match=match) as err:
        check_compatible(f, image_size)
    assert "\n" not in str(err.value)


def test_pickled_weights_are_never_loaded(tmp_path):
    vae_dir = tmp_path / "pickled" / "vae"
    tiny_vae().save_pretrained(vae_dir, safe_serialization=False)
    assert list(vae_dir.glob("*.bin"))
    with pytest.raises(ConfigError, match="no .safetensors"):
        load_vae(tmp_path / "pickled")
    with pytest.raises(ConfigError, match="no .safetensors"):
        check_compatible(tmp_path / "pickled", 16)


# ------------------------------------------------------------------ `python -m hdlib pretrain`, end to end
# One tiny pre-training run (recipe sweep, then the run with its comparison and both judges) is shared by
# the tests below; they run in this order, the last one extends the run.
TINY = ["study.progress=false", "diffusion.pretrain.checkpointing_steps=2", "pretrain.eval_every=2",
        "pretrain.eval_samples=8", "pretrain.eval_inference_steps=2", "pretrain.final_eval_samples=8",
        "pretrain.final_inference_steps=2", "autoencoder.train.max_steps=3", "data.pool_holdout=4",
        "pretrain.judge_epochs=1", "pretrain.baseline_seeds=[0,1]", "pretrain.ae_eval_every=2"]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """`python -m hdlib pretrain` on tiny settings: the recipe sweep (on the run's own latents), then
    the run with --compare (the in-study baseline at two seeds), exported with its card."""
    tmp = tmp_path_factory.mktemp("pretrain")
    baseline = tmp / "baseline.yaml"
    baseline.write_text(SMOKE.read_text() + "pretrain: {eval_every: 2, eval_samples: 8, eval_inference_steps: 2, "
                                            "final_eval_samples: 8, final_inference_steps: 2}\n")
    ov = [f"study.results_root={tmp / 'results'}", "study.data_root=data", *TINY,
          "diffusion.pretrain.max_steps=4", f"pretrain.export_dir={tmp / 'model'}"]
    sweep = ["pretrain.sweep_steps=2", 'pretrain.recipe_sweep=["configured:", "min_snr: diffusion.snr_gamma=5"]']
    pretrain_main(str(SMOKE), ov + sweep, sweep=True)
    pretrain_main(str(SMOKE), ov, compare=str(baseline))
    return SimpleNamespace(ov=ov, baseline=baseline, model=tmp / "model", cfg=load_config(SMOKE, ov),
                           card=json.loads((tmp / "model" / "card.json").read_text()))


@pytest.mark.slow
def test_pretrain_measures_quality_while_it_trains(pretrained_run):
    """One row per denoiser chunk; the autoencoder's ceiling was measured where the sweep had left it."""
    metrics = pretrained_run.cfg.results_dir / "metrics"
    evals = pd.read_csv(metrics / "pretrain_eval.csv")
    assert list(evals["step"]) == [2, 4] and (evals["fid"] > 0).all()
    ae_evals = pd.read_csv(metrics / "pretrain_ae_eval.csv")
    assert list(ae_evals["step"]) == [3] and (ae_evals["fid"] > 0).all()  # the sweep had trained it to 3 already


@pytest.mark.slow
def test_pretrain_export_loads_with_plain_diffusers(pretrained_run):
    model = pretrained_run.model
    UNet2DModel.from_pretrained(model / "unet", use_safetensors=True)
    AutoencoderKL.from_pretrained(model / "vae", use_safetensors=True)
    verify(model)


@pytest.mark.slow
def test_pretrain_card_holds_comparison_sweep_and_autoencoder_curve(pretrained_run):
    card, text = pretrained_run.card, (pretrained_run.model / "MODEL_CARD.md").read_text()
    comp = card["comparison_with_in_study_pretraining"]
    assert comp["shipped"]["fid"] > 0 and comp["in_study"]["fid"] > 0
    assert "in-study pre-training (before)" in text
    rows = card["recipe_sweep"]  # each variant's EMA weights, judged by the provenance-trained judge
    assert [(r["variant"], r["weights"]) for r in rows] == [("configured", "ema"), ("min_snr", "ema")]
    assert all(r["fid"] > 0 and r["steps"] == 2 and 0 <= r["mixture_tv"] <= 1 and r["random_judge_fid"] > 0
               for r in rows)
    assert "How the recipe was chosen" in text
    assert [r["step"] for r in card["autoencoder_during_training"]] == [3]
    assert "ceiling while it trained" in text
    # the verdicts are stored with their numbers, and the markdown is the rendering of card.json
    v = card["verdicts"]
    assert v["comparison"]["verdict"] in ("shipped_lower", "shipped_not_lower")
    assert v["comparison"]["shipped_fid"] == comp["shipped"]["fid"]
    assert v["recipe_sweep"]["configured_variant"] == "configured"
    assert text == model_card_text(card) and v == card_verdicts(card)


@pytest.mark.slow
def test_pretrain_card_holds_the_provenance_judges_verdict(pretrained_run):
    """The second judge, trained on the pool's provenance: in the card, with its figure."""
    card = pretrained_run.card
    pj = card["pool_judge"]
    assert set(pj["models"]) == {"shipped", "in_study_seed0", "in_study_seed1"}
    assert pj["split_half"]["fid"] < max(m["fid"] for m in pj["models"].values())  # real halves beat some model
    assert pj["in_study_over_seeds"]["fid"]["values"] == [pj["models"][f"in_study_seed{s}"]["fid"] for s in (0, 1)]
    assert pj["models"]["in_study_seed0"]["fid"] != pj["models"]["in_study_seed1"]["fid"]  # another draw indeed
    assert len(pj["judge"]["classes"]) >= 2 and 0 <= pj["judge"]["holdout_accuracy"] <= 1
    for m in pj["models"].values():
        assert m["fid"] > 0 and 0 <= m["mixture_tv"] <= 1 and abs(sum(m["mixture"]) - 1) < 1e-9
        assert m["autoencoder_ceiling"]["fid"] > 0 and 0 <= m["autoencoder_ceiling"]["tissue_kept"] <= 1
    v = card["verdicts"]
    assert v["pool_judge"]["verdict"] in ("clearly_below_every_run", "below_mean_within_noise", "not_below")
    assert [r["seed"] for r in v["pool_judge_per_run"]] == ["0", "1"]
    assert "A second judge" in (pretrained_run.model / "MODEL_CARD.md").read_text()
    assert (pretrained_run.model / "pretrain_mixture.png").exists()


@pytest.mark.slow
def test_pretrain_assess_rejudges_an_exported_model_without_touching_it(pretrained_run):
    """update_card drops a section (weights untouched); --assess puts the second judge's verdict back,
    from the same samples (cached by the model's content) and the same judge."""
    model, pj = pretrained_run.model, pretrained_run.card["pool_judge"]
    digest = verify(model)
    update_card(model, "pool_judge", None, {})
    assert "A second judge" not in (model / "MODEL_CARD.md").read_text()
    assert "pool_judge" not in json.loads((model / "card.json").read_text())["verdicts"]
    pretrain_main(str(SMOKE), pretrained_run.ov, assess=str(pretrained_run.baseline))
    assert json.loads((model / "card.json").read_text())["pool_judge"]["models"]["shipped"]["fid"] == \
        pj["models"]["shipped"]["fid"]
    assert verify(model) == digest


@pytest.mark.slow
def test_pretrain_rerun_resumes_without_training(pretrained_run):
    log = pretrained_run.cfg.results_dir / "models" / "denoiser_pretrained" / "log.csv"
    before = log.stat().st_mtime_ns
    pretrain_main(str(SMOKE), pretrained_run.ov)
    assert log.stat().st_mtime_ns == before  # resumed: nothing left to train
    assert "previous_version" not in json.loads((pretrained_run.model / "card.json").read_text())  # the same model


@pytest.mark.slow
def test_pretrain_longer_run_replaces_the_export_and_says_what_it_replaced(pretrained_run):
    """A longer run of the same recipe (constant lr: the same trajectory) replaces the export; its card
    says what it replaced, by the same judges. Extends the shared run, so it comes last."""
    model = pretrained_run.model
    digest = verify(model)
    pretrain_main(str(SMOKE), [o.replace("max_steps=4", "max_steps=6") for o in pretrained_run.ov])
    card = json.loads((model / "card.json").read_text())
    assert card["denoiser"]["steps"] == 6 and card["previous_version"]["sha256"] == digest
    assert card["previous_version"]["denoiser_steps"] == 4
    text = (model / "MODEL_CARD.md").read_text()
    assert "What this version replaced" in text and digest[:16] in text and text == model_card_text(card)


def test_bad_recipe_variant_fails_before_any_compute(tmp_path):
    with pytest.raises(ConfigError, match="recipe_sweep"):
        pretrain_main(str(SMOKE), [f"study.results_root={tmp_path}", 'pretrain.recipe_sweep=["no name here"]'],
                      sweep=True)
    assert not any(tmp_path.iterdir())


def test_config_with_changes_one_setting_of_a_frozen_config():
    cfg = load_config(SMOKE)
    longer = config_with(cfg, "diffusion.pretrain.max_steps", cfg.diffusion.pretrain.max_steps + 7)
    assert longer.diffusion.pretrain.max_steps == cfg.diffusion.pretrain.max_steps + 7
    assert load_config(SMOKE) == cfg  # the original is left as it is
    assert dataclasses.replace(longer.diffusion.pretrain, max_steps=cfg.diffusion.pretrain.max_steps) == \
        cfg.diffusion.pretrain and longer.autoencoder == cfg.autoencoder
    assert config_with(cfg, "pretrain.export_dir", "").pretrain.export_dir == ""


def test_judge_is_fixed_and_sees_blur():
    """The pool judge is the same network in every process (seeded, untrained), and it tells
    blurred tissue from sharp tissue: blurring half of a textured set moves it further than the
    split-half noise floor, more so the stronger the blur."""
    g = torch.Generator().manual_seed(0)
    # textured "tiles": a coarse colour field plus per-pixel detail that blur removes
    coarse = torch.nn.functional.interpolate(torch.rand(96, 3, 8, 8, generator=g), size=64, mode="bilinear")
    images = ((0.6 * coarse + 0.4 * torch.rand(96, 3, 64, 64, generator=g)) * 255).to(torch.uint8)
    judge = RandomResNetJudge()
    first = judge(images[:8])
    assert torch.equal(first, RandomResNetJudge()(images[:8]))
    s = judge_sensitivity(judge, images, sigmas=(0.7, 1.5))
    assert s["blur_fid"]["0.7"] > 2 * s["split_half_fid"]
    assert s["blur_fid"]["1.5"] > s["blur_fid"]["0.7"]


def test_matched_size_fid_ranks_a_shifted_set_above_a_same_distribution_set():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(200, 16, generator=g, dtype=torch.float64)
    same = torch.randn(600, 16, generator=g, dtype=torch.float64)
    shifted = same + 0.5
    a, b = matched_size_fid(same, ref, 200, draws=4), matched_size_fid(shifted, ref, 200, draws=4)
    assert len(a["draws"]) == 4 and a["n"] == 200 and a["sd"] > 0
    assert b["mean"] > a["mean"] + 2  # 16 dims x 0.5^2 = 4 from the mean shift alone


def test_other_run_must_be_a_finished_pretraining_folder(tmp_path):
    with pytest.raises(ConfigError, match="other_runs"):
        parse_other_run(f"v-prediction: {tmp_path}")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "pretrain_final.json").write_text("{}")
    assert parse_other_run(f"v-prediction: {tmp_path}") == ("v-prediction", tmp_path)


def test_shipped_card_is_rendered_from_its_json():
    """MODEL_CARD.md says what card.json (written by the pipeline) holds: no hand edits. Its verdicts
    are the ones its numbers give, and card.json is what the card writer makes of itself."""
    card_text = (SHIPPED / "card.json").read_text()
    card = json.loads(card_text)
    assert (SHIPPED / "MODEL_CARD.md").read_text() == model_card_text(card)
    assert card["verdicts"] == card_verdicts(card)
    assert card_files(card) == {"card.json": card_text, "MODEL_CARD.md": model_card_text(card)}
    verify(SHIPPED)


def test_verdicts_follow_the_numbers_and_every_code_has_its_sentence():
    """Each verdict is a code computed from the numbers it is stored with; the card's template has a
    sentence for every code."""
    assert comparison_verdict({"shipped": {"fid": 3.0}, "in_study": {"fid": 4.0}})["verdict"] == "shipped_lower"
    assert comparison_verdict({"shipped": {"fid": 4.0}, "in_study": {"fid": 4.0}})["verdict"] == "shipped_not_lower"

    def pj(shipped, runs, sd=1.0):
        ms = {"shipped": {"fid": shipped, "matched_size": {"mean": shipped, "sd": sd}}}
        ms |= {f"in_study_seed{i}": {"fid": f, "matched_size": {"mean": f, "sd": sd}} for i, f in enumerate(runs)}
        mean = sum(runs) / len(runs)
        return {"models": ms, "in_study_over_seeds": {"fid": {"mean": mean, "sd": 0.0, "values": runs},
                                                      "matched_size_fid": {"mean": mean, "sd": 0.0}}}

    assert pool_judge_verdict(pj(10, [13, 20]))["verdict"] == "clearly_below_every_run"  # gap 3 = 3 spreads
    assert pool_judge_verdict(pj(10, [11, 20]))["verdict"] == "below_mean_within_noise"
    assert pool_judge_verdict(pj(16, [11, 20]))["verdict"] == "not_below"
    rows = [{"variant": "configured", "weights": "ema", "fid": 4.0},
            {"variant": "configured", "weights": "raw", "fid": 1.0},
            {"variant": "v", "weights": "ema", "fid": 3.0}]
    assert sweep_verdict(rows) == {"verdict": "variant_first", "best_variant": "v", "best_fid": 3.0,
                                   "configured_variant": "configured", "configured_fid": 4.0}
    assert sweep_verdict(rows[:2])["verdict"] == "configured_first"  # raw weights never rank
    numbers = {}  # every number a verdict of the shipped card (and of v3's, which had every section) holds
    for card in (ROOT / "tests" / "fixtures" / "card_v3.json", SHIPPED / "card.json"):
        for v in json.loads(card.read_text())["verdicts"].values():
            numbers |= v if isinstance(v, dict) else {}
    for name, text in VERDICTS.items():
        for code in (text if isinstance(text, dict) else [None]):
            text = say(numbers | {"verdict": code}, name)
            assert "{" not in text and "}" not in text  # every placeholder filled from the card's numbers


def test_autoencoder_init_from_fine_tunes_an_external_vae(folder, tmp_path):
    """autoencoder.init_from: training starts from that vae's weights, in its architecture; a
    bad folder or a downsampling that does not divide the image size is a one-line error; new
    weights under the same path give stage 01 a new fingerprint."""
    cfg = load_config(ROOT / "params" / "smoke.yaml", [f"autoencoder.init_from={folder}"])
    vae = build_autoencoder(cfg.autoencoder, weights=True)
    src = load_vae(folder)
    assert all(torch.equal(p, q) for p, q in zip(vae.state_dict().values(), src.state_dict().values()))
    fresh = build_autoencoder(cfg.autoencoder)  # the architecture only (what load_autoencoder fills in)
    assert fresh.config.latent_channels == 3 and list(fresh.config.block_out_channels) == [8, 8]
    assert autoencoder_downsampling(cfg.autoencoder) == 2
    check_init_vae(folder, 16)
    with pytest.raises(ConfigError, match=r"^autoencoder.init_from: .*not divisible"):
        check_init_vae(folder, 15)
    with pytest.raises(ConfigError, match=r"^autoencoder.init_from: .*not a folder"):
        check_init_vae(tmp_path / "nowhere", 16)
    stages = discover_stages(ROOT / "notebooks")
    before = stage_fingerprints(cfg, stages)["01_autoencoder"]
    torch.manual_seed(5)
    export_pretrained(folder, tiny_vae(), tiny_unet(), DDPMScheduler(num_train_timesteps=50), scaling_factor=0.7)
    assert stage_fingerprints(cfg, stages)["01_autoencoder"] != before


def test_autoencoder_ceiling_is_tracked_while_it_trains_and_resumes(tmp_path):
    """pretrain.ae_eval_every: the autoencoder trains in chunks (the same trajectory) and its
    ceiling is measured after each; a re-run measures nothing again."""
    cfg = load_config(ROOT / "params" / "smoke.yaml", [
        f"study.results_root={tmp_path}", "study.data_root=data", "study.progress=false", "data.pool_holdout=4",
        "autoencoder.train.max_steps=3", "autoencoder.train.checkpointing_steps=1", "pretrain.ae_eval_every=2",
        "pretrain.judge_epochs=1"])
    prepare_data(cfg)
    train_autoencoder_tracked(cfg)
    path = cfg.results_dir / "metrics" / "pretrain_ae_eval.csv"
    rows = pd.read_csv(path)
    assert list(rows["step"]) == [2, 3] and (rows["fid"] > 0).all() and rows["tissue_kept"].between(0, 1).all()
    assert cfg.autoencoder.train.max_steps == 3
    before = path.stat().st_mtime_ns
    train_autoencoder_tracked(cfg)
    assert path.stat().st_mtime_ns == before


def test_pretrain_folder_refuses_another_recipe_but_extends_its_own(tmp_path, folder):
    """A resumed pretrain run with another recipe would mix its checkpoints and curves with the old
    one's; a longer run of the same recipe (constant lr) is the same trajectory and may continue."""
    base = [f"study.results_root={tmp_path}"]
    check_run_recipe(load_config(ROOT / "params" / "smoke.yaml", base))
    assert StudyPaths(load_config(ROOT / "params" / "smoke.yaml", base)).metrics(RUN_KEY).exists()
    check_run_recipe(load_config(ROOT / "params" / "smoke.yaml", base + ["diffusion.pretrain.max_steps=99999",
                                                                        "pretrain.threads=1"]))
    with pytest.raises(ConfigError, match=r"another recipe .*diffusion\.block_out_channels"):
        check_run_recipe(load_config(ROOT / "params" / "smoke.yaml", base + ["diffusion.block_out_channels=[8,16]"]))
    with pytest.raises(ConfigError, match="init_from_vae_sha256"):
        check_run_recipe(load_config(ROOT / "params" / "smoke.yaml", base + [f"autoencoder.init_from={folder}"]))


def test_report_quotes_the_card_of_the_studys_own_model_only():
    """The study report quotes the shipped card's figures (both versions by one provenance-trained judge,
    when the card has them) only when the folder still holds the model the study pinned."""
    card = json.loads((SHIPPED / "card.json").read_text())
    pin = load_config(ROOT / "params" / "default.yaml").pretrained.sha256
    text = pretrained_section("models/demo-pool", pin)
    assert pin[:16] in text and f"FID to {card['quality_final']['holdout_tiles']} held-out pool tiles" in text
    if card.get("versions"):
        a, b = card["versions"]["models"]["this model"], card["versions"]["models"]["previous"]
        assert f"FID {a['fid']:.1f} vs {b['fid']:.1f}, recall {a['recall']:.2f} vs {b['recall']:.2f}" in text
    other = pretrained_section("models/demo-pool", "0" * 64)  # a study made with another version
    assert "now holds another version" in other and "From its card" not in other


def test_report_and_card_name_the_second_judges_figures():
    """The study report quotes the shipped card's provenance-trained-judge FIDs, and the card's verdict
    compares the model with each in-study run alone as well as with the recipe over seeds."""
    from hdlib.stages.report import _card_figures

    card = json.loads((ROOT / "tests" / "fixtures" / "card_v3.json").read_text())  # v3's card: it has the comparison
    pj = card["pool_judge"]
    text = _card_figures(card)
    assert f"provenance-trained judge: FID {pj['models']['shipped']['fid']:.1f}" in text
    assert f"{pj['in_study_over_seeds']['fid']['mean']:.1f} ± {pj['in_study_over_seeds']['fid']['sd']:.1f}" in text
    seeds = [k.removeprefix("in_study_seed") for k in pj["models"] if k.startswith("in_study")]
    per_run = card["verdicts"]["pool_judge_per_run"]
    assert [r["seed"] for r in per_run] == seeds
    for r in per_run:
        m = pj["models"][f"in_study_seed{r['seed']}"]["matched_size"]
        assert r["gap"] == m["mean"] - pj["models"]["shipped"]["matched_size"]["mean"]
    rendered = model_card_text(card)
    assert "Each in-study run alone" in rendered and all(f"| seed {s} |" in rendered for s in seeds)


@pytest.mark.slow
def test_a_cool_down_branch_ships_judged_beside_the_version_it_replaces(pretrained_run, tmp_path):
    """Warmup-stable-decay: a branch of the constant-lr run from one of its checkpoints, its lr falling to 0,
    judged like the run's rows; shipped, the card puts it beside the previous version by the same judge, holdout
    and seeds, with samples per tissue class. Runs after the longer run (checkpoints at 4 and 6)."""
    from hdlib.pretrain.cooldown import cool_down
    from hdlib.pretrain.ship import ship

    previous = tmp_path / "previous"
    shutil.copytree(pretrained_run.model, previous)
    cfg = load_config(SMOKE, pretrained_run.ov)
    rows = cool_down(cfg, 4, 2)
    assert list(rows["step"]) == [6] and (rows["fid"] > 0).all()
    log = pd.read_csv(cfg.results_dir / "models" / "denoiser_pretrained_cooldown_4_2" / "log.csv")
    assert log["lr"].iloc[-1] == pytest.approx(cfg.diffusion.pretrain.lr / 2)  # step 6 of 4+2: half way to 0
    ship(cfg, (4, 2), str(previous))
    card = json.loads((pretrained_run.model / "card.json").read_text())
    assert card["denoiser"]["cooldown"] == {"from_step": 4, "steps": 2} and card["denoiser"]["steps"] == 6
    assert [r["phase"] for r in card["quality_during_training"]][-1] == "cool-down"
    v = card["versions"]
    assert list(v["models"]) == ["previous", "this model"] and v["previous_sha256"] == verify(previous)
    assert all(m["samples"] == 8 and m["fid"] > 0 for m in v["models"].values())
    text = (pretrained_run.model / "MODEL_CARD.md").read_text()
    assert "judged alike" in text and "pretrain_per_class.png" in text and text == model_card_text(card)
    assert (pretrained_run.model / "pretrain_per_class.png").exists()
    verify(pretrained_run.model)


@pytest.mark.slow
def test_a_long_variant_ships_with_its_own_architecture_and_curve(pretrained_run, tmp_path):
    """A long variant (here one more res block per level) trained beside the run ships in its place: the card
    names it, holds its own rows and architecture, and the exported U-Net loads with that architecture."""
    from hdlib.pretrain.ship import ship
    from hdlib.pretrain.variant import train_variant, variant_config

    ov = pretrained_run.ov + ['pretrain.long_variants=["deep: diffusion.layers_per_block=2"]']
    rows = train_variant(str(SMOKE), "deep", 4, ov)
    assert list(rows["step"]) == [2, 4]
    previous = tmp_path / "previous"
    shutil.copytree(pretrained_run.model, previous)
    ship(variant_config(str(SMOKE), ov, "deep")[1], None, str(previous), "deep")
    card = json.loads((pretrained_run.model / "card.json").read_text())
    d = card["denoiser"]
    assert (d["variant"], d["layers_per_block"], d["steps"], d["cooldown"]) == ("deep", 2, 4, None)
    assert [r["fid"] for r in card["quality_during_training"]] == list(rows["fid"])
    assert UNet2DModel.from_pretrained(pretrained_run.model / "unet").config.layers_per_block == 2
    assert "long variant `deep`" in (pretrained_run.model / "MODEL_CARD.md").read_text()
    verify(pretrained_run.model)

    from hdlib.pretrain.cooldown import cool_down  # a cool-down branch of the variant ships too
    vcfg = variant_config(str(SMOKE), ov, "deep")[1]
    branch = cool_down(load_config(SMOKE, ov), 4, 2, "deep", vcfg)
    assert list(branch["step"]) == [6] and list(branch["variant"]) == ["deep"]
    ship(vcfg, (4, 2), str(previous), "deep")
    card = json.loads((pretrained_run.model / "card.json").read_text())
    assert (card["denoiser"]["variant"], card["denoiser"]["cooldown"], card["denoiser"]["steps"]) == \
        ("deep", {"from_step": 4, "steps": 2}, 6)
    assert [r["phase"] for r in card["quality_during_training"]] == ["constant lr"] * 2 + ["cool-down"]
    assert card["quality_during_training"][-1]["fid"] == branch["fid"].iloc[0]
    verify(pretrained_run.model)


def test_ship_checks_its_inputs_before_any_compute(tmp_path):
    from hdlib.pretrain.ship import check_inputs, parse_cooldown

    assert parse_cooldown("4000+1000") == (4000, 1000) and parse_cooldown(None) is None
    with pytest.raises(ConfigError, match="--cooldown '4000': expected FROM_STEP"):
        parse_cooldown("4000")
    cfg = load_config(SMOKE, [f"study.results_root={tmp_path}", f"pretrain.export_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"--cooldown 4\+2: that branch has not finished"):
        check_inputs(cfg, (4, 2), None)
    with pytest.raises(ConfigError, match="--previous .*: not an exported model folder"):
        check_inputs(cfg, None, str(tmp_path))
    with pytest.raises(ConfigError, match="--variant deep: it has not been trained"):
        check_inputs(cfg, None, None, "deep")
    with pytest.raises(ConfigError, match=r"--cooldown 4\+2: that branch has not finished .*--variant deep"):
        check_inputs(cfg, (4, 2), None, "deep")


def test_a_loaded_model_exports_without_the_path_it_was_loaded_from(tmp_path):
    """from_pretrained records where a model came from (`_name_or_path`, a machine path); an export drops it,
    so a frozen autoencoder exported again has the same files (and pin) as before."""
    vae = load_vae(SHIPPED)
    assert vae.config.get("_name_or_path")
    out = export_pretrained(tmp_path / "again", vae)
    assert (out / "vae" / "config.json").read_bytes() == (SHIPPED / "vae" / "config.json").read_bytes()


def test_the_docs_summary_of_the_shipped_versions_is_read_back_from_its_card():
    """docs/pretrained.md sums up v4 against v3 in words; each word is checked against the card's numbers."""
    text = " ".join((ROOT / "docs" / "pretrained.md").read_text().split())
    v = json.loads((SHIPPED / "card.json").read_text())["versions"]
    now, before, real = v["models"]["this model"], v["models"]["previous"], v["real_shares"]
    assert "lowers that judge's FID to less than half of v3's" in text and now["fid"] < before["fid"] / 2
    assert "draws lymphocyte, stroma and adipose tiles that v3 almost never drew" in text
    for g in ("LYM", "STR", "ADI"):
        assert before[f"share_{g}"] <= 0.02 < now[f"share_{g}"]
    assert "still draws too much background and too few lymphocyte and normal-mucosa tiles" in text
    assert now["share_BACK"] > real["BACK"] and now["share_LYM"] < real["LYM"] and now["share_NORM"] < real["NORM"]


def test_targets_are_judged_on_tissue_classes_and_said_in_the_card():
    from hdlib.pretrain.verdicts import target_rows

    def row(fid, share_lym):
        return {"fid": fid, "recall": 0.9, "precision": 0.81, "mixture_tv": 0.1, "share_LYM": share_lym,
                "share_TUM": 0.5, "share_he_src": 0.0}
    v = {"models": {"previous": row(120.0, 0.0), "this model": row(50.0, 0.2)},
         "real_shares": {"LYM": 0.3, "TUM": 0.5, "he_src": 0.2}, "tissue_classes": ["LYM", "TUM"]}
    rows = target_rows(v)
    assert [r["met"] for r in rows] == [True, True, True, True, True]  # he_src (a real source) is not a tissue class
    assert rows[-1]["measure"].startswith("least-drawn tissue class (LYM)") and rows[-1]["value"] == pytest.approx(2 / 3)
    v["models"]["this model"]["share_LYM"] = 0.1
    assert target_rows(v)[-1]["met"] is False
    card = json.loads((SHIPPED / "card.json").read_text())
    text = (SHIPPED / "MODEL_CARD.md").read_text()
    met = [r["met"] for r in card["verdicts"]["targets"]]
    assert ("Every target is met." in text) == all(met) and text.count("**no** |") == met.count(False)
