"""Pre-trained models in diffusers format: the shipped one loads with plain diffusers and
samples; external folders of any latent channels / downsampling work; mismatches and
pickled weights are one-line errors before any compute; export round-trips."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from hdlib.errors import ConfigError
from hdlib.pretrained import (MANIFEST, check_compatible, export_pretrained, folder_sha256, load_scheduler,
                              load_unet, load_vae, read_latent_info, verify)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "demo-pool"


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
    from diffusers import DDIMScheduler

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


def test_pretrain_entry_point_trains_evaluates_exports_and_compares(tmp_path):
    """`python -m hdlib pretrain` on tiny settings: quality is measured while it trains (one row
    per chunk), the export loads with plain diffusers, its card holds the before/after
    comparison, and a re-run resumes without training again."""
    import pandas as pd

    from hdlib.config import load_config
    from hdlib.pretrain import main, update_card

    tiny = ["study.progress=false", "diffusion.pretrain.checkpointing_steps=2", "pretrain.eval_every=2",
            "pretrain.eval_samples=8", "pretrain.eval_inference_steps=2", "pretrain.final_eval_samples=8",
            "pretrain.final_inference_steps=2", "autoencoder.train.max_steps=3", "data.pool_holdout=4",
            "pretrain.judge_epochs=1", "pretrain.baseline_seeds=[0,1]", "pretrain.ae_eval_every=2"]
    smoke = (ROOT / "params" / "smoke.yaml").read_text()
    baseline = tmp_path / "baseline.yaml"
    baseline.write_text(smoke + "pretrain: {eval_every: 2, eval_samples: 8, eval_inference_steps: 2, "
                                "final_eval_samples: 8, final_inference_steps: 2}\n")
    ov = [f"study.results_root={tmp_path / 'results'}", "study.data_root=data", *tiny,
          "diffusion.pretrain.max_steps=4", f"pretrain.export_dir={tmp_path / 'model'}"]
    smoke_path = ROOT / "params" / "smoke.yaml"
    sweep = ["pretrain.sweep_steps=2", 'pretrain.recipe_sweep=["configured:", "min_snr: diffusion.snr_gamma=5"]']
    main(str(smoke_path), ov + sweep, sweep=True)  # the recipe sweep, on the run's own latents
    main(str(smoke_path), ov, compare=str(baseline))
    cfg = load_config(smoke_path, ov)
    evals = pd.read_csv(cfg.results_dir / "metrics" / "pretrain_eval.csv")
    assert list(evals["step"]) == [2, 4] and (evals["fid"] > 0).all()
    ae_evals = pd.read_csv(cfg.results_dir / "metrics" / "pretrain_ae_eval.csv")  # the AE's ceiling while it trained
    assert list(ae_evals["step"]) == [3] and (ae_evals["fid"] > 0).all()  # the sweep had trained it to 3 already
    model = tmp_path / "model"
    UNet2DModel.from_pretrained(model / "unet", use_safetensors=True)
    AutoencoderKL.from_pretrained(model / "vae", use_safetensors=True)
    verify(model)
    card = json.loads((model / "card.json").read_text())
    comp = card["comparison_with_in_study_pretraining"]
    assert comp["shipped"]["fid"] > 0 and comp["in_study"]["fid"] > 0
    assert "in-study pre-training (before)" in (model / "MODEL_CARD.md").read_text()
    rows = card["recipe_sweep"]  # the configured recipe judged with EMA and raw weights, then each variant
    assert [(r["variant"], r["weights"]) for r in rows] == [("configured", "ema"), ("configured", "raw"),
                                                            ("min_snr", "ema")]
    assert all(r["fid"] > 0 and r["steps"] == 2 for r in rows)
    assert "How the recipe was chosen" in (model / "MODEL_CARD.md").read_text()
    assert [r["step"] for r in card["autoencoder_during_training"]] == [3]
    assert "ceiling while it trained" in (model / "MODEL_CARD.md").read_text()
    # the second judge, trained on the pool's provenance: in the card, with its figure, weights untouched
    pj = card["pool_judge"]
    assert set(pj["models"]) == {"shipped", "in_study_seed0", "in_study_seed1"} and pj["split_half"]["fid"] >= 0
    assert pj["in_study_over_seeds"]["fid"]["values"] == [pj["models"][f"in_study_seed{s}"]["fid"] for s in (0, 1)]
    assert pj["models"]["in_study_seed0"]["fid"] != pj["models"]["in_study_seed1"]["fid"]  # another draw indeed
    assert len(pj["judge"]["classes"]) >= 2 and 0 <= pj["judge"]["holdout_accuracy"] <= 1
    for m in pj["models"].values():
        assert m["fid"] > 0 and 0 <= m["mixture_tv"] <= 1 and abs(sum(m["mixture"]) - 1) < 1e-9
        assert m["autoencoder_ceiling"]["fid"] > 0 and 0 <= m["autoencoder_ceiling"]["tissue_kept"] <= 1
    assert "A second judge" in (model / "MODEL_CARD.md").read_text() and (model / "pretrain_mixture.png").exists()
    digest = verify(model)
    update_card(model, "pool_judge", None, {})
    assert "A second judge" not in (model / "MODEL_CARD.md").read_text()
    main(str(smoke_path), ov, assess=str(baseline))  # judge an exported model again, without training
    assert json.loads((model / "card.json").read_text())["pool_judge"]["models"]["shipped"]["fid"] == \
        pj["models"]["shipped"]["fid"]  # the same samples (cached by the model's content), the same judge
    assert verify(model) == digest
    with pytest.raises(ConfigError, match="recipe_sweep"):
        main(str(smoke_path), ov + ['pretrain.recipe_sweep=["no name here"]'], sweep=True)
    log = cfg.results_dir / "models" / "denoiser_pretrained" / "log.csv"
    before = log.stat().st_mtime_ns
    main(str(smoke_path), ov)
    assert log.stat().st_mtime_ns == before  # resumed: nothing left to train
    assert "previous_version" not in json.loads((model / "card.json").read_text())  # the same model re-exported
    # a longer run of the same recipe replaces the export: its card says what it replaced, by the same judges
    main(str(smoke_path), [o.replace("max_steps=4", "max_steps=6") for o in ov])
    card = json.loads((model / "card.json").read_text())
    assert card["denoiser"]["steps"] == 6 and card["previous_version"]["sha256"] == digest
    assert card["previous_version"]["denoiser_steps"] == 4
    text = (model / "MODEL_CARD.md").read_text()
    assert "What this version replaced" in text and digest[:16] in text


def test_judge_is_fixed_and_sees_blur():
    """The pool judge is the same network in every process (seeded, untrained), and it tells
    blurred tissue from sharp tissue: blurring half of a textured set moves it further than the
    split-half noise floor, more so the stronger the blur."""
    from hdlib.pretrain import RandomResNetJudge, judge_sensitivity

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
    from hdlib.pretrain import matched_size_fid

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(200, 16, generator=g, dtype=torch.float64)
    same = torch.randn(600, 16, generator=g, dtype=torch.float64)
    shifted = same + 0.5
    a, b = matched_size_fid(same, ref, 200, draws=4), matched_size_fid(shifted, ref, 200, draws=4)
    assert len(a["draws"]) == 4 and a["n"] == 200 and a["sd"] > 0
    assert b["mean"] > a["mean"] + 2  # 16 dims x 0.5^2 = 4 from the mean shift alone


def test_other_run_must_be_a_finished_pretraining_folder(tmp_path):
    from hdlib.pretrain import parse_other_run

    with pytest.raises(ConfigError, match="other_runs"):
        parse_other_run(f"v-prediction: {tmp_path}")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "pretrain_final.json").write_text("{}")
    assert parse_other_run(f"v-prediction: {tmp_path}") == ("v-prediction", tmp_path)


def test_shipped_card_is_rendered_from_its_json():
    """MODEL_CARD.md says what card.json (written by the pipeline) holds: no hand edits."""
    from hdlib.pretrain import model_card_text

    card = json.loads((SHIPPED / "card.json").read_text())
    assert (SHIPPED / "MODEL_CARD.md").read_text() == model_card_text(card)
    verify(SHIPPED)


def test_autoencoder_init_from_fine_tunes_an_external_vae(folder, tmp_path):
    """autoencoder.init_from: training starts from that vae's weights, in its architecture; a
    bad folder or a downsampling that does not divide the image size is a one-line error; new
    weights under the same path give stage 01 a new fingerprint."""
    from hdlib.config import load_config
    from hdlib.models import autoencoder_downsampling, build_autoencoder
    from hdlib.pretrained import check_init_vae
    from hdlib.runner import discover_stages, stage_fingerprints

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
    import pandas as pd

    from hdlib.config import load_config
    from hdlib.pretrain import train_autoencoder_tracked
    from hdlib.study.preparation import prepare_data

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
    from hdlib.config import load_config
    from hdlib.errors import ConfigError
    from hdlib.pretrain import RUN_KEY, check_run_recipe
    from hdlib.paths import StudyPaths

    base = [f"study.results_root={tmp_path}"]
    check_run_recipe(load_config(ROOT / "params" / "smoke.yaml", base))
    assert StudyPaths(load_config(ROOT / "params" / "smoke.yaml", base)).metrics(RUN_KEY).exists()
    check_run_recipe(load_config(ROOT / "params" / "smoke.yaml", base + ["diffusion.pretrain.max_steps=99999",
                                                                        "pretrain.threads=1"]))
    with pytest.raises(ConfigError, match=r"another recipe .*diffusion\.block_out_channels"):
        check_run_recipe(load_config(ROOT / "params" / "smoke.yaml", base + ["diffusion.block_out_channels=[8,16]"]))
    with pytest.raises(ConfigError, match="init_from_vae_sha256"):
        check_run_recipe(load_config(ROOT / "params" / "smoke.yaml", base + [f"autoencoder.init_from={folder}"]))


def test_report_and_card_name_the_second_judges_figures():
    """The study report quotes the shipped card's provenance-trained-judge FIDs, and the card's verdict
    compares the model with each in-study run alone as well as with the recipe over seeds."""
    from hdlib.config import load_config
    from hdlib.pretrain import _pool_judge_text
    from hdlib.stages.report import pretrained_section

    card = json.loads((ROOT / "models" / "demo-pool" / "card.json").read_text())
    pj = card["pool_judge"]
    text = pretrained_section("models/demo-pool")
    assert load_config(ROOT / "params" / "default.yaml").pretrained.sha256[:16] in text
    assert f"provenance-trained judge: FID {pj['models']['shipped']['fid']:.1f}" in text
    assert f"{pj['in_study_over_seeds']['fid']['mean']:.1f} ± {pj['in_study_over_seeds']['fid']['sd']:.1f}" in text
    verdict = _pool_judge_text(card)
    seeds = [k.removeprefix("in_study_seed") for k in pj["models"] if k.startswith("in_study")]
    assert "Against each in-study run alone" in verdict and all(f"seed {s} " in verdict for s in seeds)
