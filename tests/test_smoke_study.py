"""The whole smoke study (params/smoke.yaml) through papermill, as a user would run it."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.paths import StudyPaths
from hdlib.stages.report import accuracy_table
from hdlib.tools.runner import run_study

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"
STAGES = ["00_data", "01_autoencoder", "02_diffusion", "03_guidance", "04_synthesis", "05_downstream",
          "06_quality", "07_report"]


PROGRESS = []  # (stage, event) the runner received from inside the stages' kernels


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    overrides = [f"study.results_root={root / 'results'}", f"study.data_root={root / 'data'}"]
    status = run_study(SMOKE, overrides, log=print, record_reads=root / "reads",
                       on_progress=lambda stage, event: PROGRESS.append((stage, event)))
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
def test_every_stage_reads_only_the_config_it_declares(study):
    """Each stage's kernel (and its grid workers) recorded every config key it read
    (hdlib.config_reads); a read outside the stage's READS declaration would key no fingerprint,
    so changing that setting would leave a stale result. Stage 00 reads downstream.seeds, for one."""
    from hdlib.config_reads import read_keys
    from hdlib.tools.stage_inputs import declared_reads, undeclared

    reads_dir = study[0].results_dir.parent.parent / "reads"
    recorded = {s: read_keys(reads_dir / f"{s}.txt") for s in STAGES}
    assert all(recorded.values()), [s for s, r in recorded.items() if not r]
    outside = {s: undeclared(recorded[s], declared_reads(s)["config"]) for s in STAGES}
    assert outside == {s: [] for s in STAGES}
    assert "downstream.seeds" in recorded["00_data"] and "downstream.training_sets" in recorded["02_diffusion"]


@pytest.mark.slow
def test_the_runner_sees_progress_from_inside_each_training_stage_and_no_bar_reaches_a_notebook(study):
    """The kernel reports its units of work through a side channel (hdlib.progress) that the runner
    renders; the executed notebooks stay free of bars."""
    cfg = study[0]
    tasks = {}
    for stage, e in PROGRESS:
        tasks.setdefault(stage, set()).add(e["task"].split(" ")[0])
    for stage in ("01_autoencoder", "02_diffusion", "03_guidance"):
        assert "training" in tasks.get(stage, set()), (stage, tasks.get(stage))
    assert "grid" in tasks["03_guidance"] and "grid" in tasks["05_downstream"]
    finished = [e for s, e in PROGRESS if s == "05_downstream" and e["task"] == "grid cells"]
    assert finished[-1]["done"] == finished[-1]["total"] > 0
    for nb in cfg.results_dir.glob("[0-9][0-9]_*.ipynb"):
        text = nb.read_text()
        assert "it/s]" not in text and "s/it]" not in text and "\u2588" not in text, nb.name


@pytest.mark.slow
def test_the_combined_arm_adds_the_rivals_and_histodiffusions_images(study):
    """histodiffusion+pseudo_label trains on the rival's pseudo-labeled images plus HistoDiffusion's kept
    ones, cell for cell; its comparison with the rival is a pre-declared, Holm-corrected headline figure."""
    cfg = study[0]
    raw = pd.read_csv(cfg.results_dir / "tables" / "downstream_grid_raw.csv")
    key = ["fraction", "ratio", "seed"]
    arms = {s: raw[raw.training_set == s].set_index(key)["n_synthetic"]
            for s in ("histodiffusion", "pseudo_label", "histodiffusion+pseudo_label")}
    both = arms["histodiffusion+pseudo_label"]
    assert len(both) and (both == arms["histodiffusion"].loc[both.index] + arms["pseudo_label"].loc[both.index]).all()
    m = json.loads((cfg.results_dir / "metrics" / "05_downstream.json").read_text())
    for k in ("vs_real", "vs_rival", "combined_vs_rival"):
        assert {"mean_diff", "ci_low", "ci_high", "p_holm"} <= set(m[k])
        assert not m[k]["p_holm"] < m[k]["t_pvalue"] - 1e-12  # Holm never lowers a p-value (NaN: no spread)
    assert m["primary_cell"]["rule_agrees"] and "margin" in m["primary_cell"]["rule_margin"]  # not frozen: the rule's cell


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
    """Every batch the autoencoder and the pre-training denoiser can draw comes from the pool;
    no pool row is a target image, and no pool latent equals a target latent."""
    from hdlib.study.latents import latent_store
    from hdlib.study.splits import split_images
    from hdlib.study.train import build_task

    cfg, _, _ = study
    target = torch.cat([torch.stack([ds[i][0] for i in range(len(ds))])
                        for ds in (split_images(cfg, s) for s in ("target_train", "target_val", "target_test"))]).flatten(1)
    ae = build_task(cfg, "autoencoder")
    pool = ae.dataset.dataset
    assert len(pool) == cfg.data.pool_size and all(not r.source.startswith("target") for r in pool.records)
    pool_imgs = torch.stack([pool[i][0] for i in range(len(pool))]).flatten(1)
    assert not any((target == row).all(1).any() for row in pool_imgs)
    store = latent_store(cfg)
    pre = build_task(cfg, "denoiser_pretrained")
    assert len(pre.dataset) == len(store.mean("pool"))
    mean, _ = pre.dataset[torch.arange(len(pre.dataset))]
    tz = torch.cat([store.means(s) for s in ("target_train", "target_val", "target_test")]).flatten(1)
    assert torch.cdist(mean.flatten(1), tz).min() > 0


@pytest.mark.slow
def test_sharded_sampling_on_two_processes_matches_one(study):
    """Rounds split over 2 processes (the launcher, gloo on the CPU) give the latents of a 1-process
    run (each image has its own seed, whatever its shard), and every round of a set is answered by
    one process group that loaded its models once (before: one launch per round)."""
    from hdlib.paths import StudyPaths
    from hdlib.study.context import config_from_results
    from hdlib.study.generation import Generation
    from hdlib.study.synthetic_sets import ShardedSampler

    cfg, _, _ = study
    two = config_from_results(cfg.results_dir, ["study.num_processes=2"])
    f, d = min(cfg.downstream.fractions), cfg.downstream.seeds[0]
    labels = torch.arange(len(cfg.data.classes)).repeat_interleave(2)
    seeds = torch.arange(len(labels)) + 12345
    one = Generation(config_from_results(cfg.results_dir))
    launches = ShardedSampler.launches
    with ShardedSampler(Generation(two), "histodiffusion", f, d, None, StudyPaths(two).synthetic("shard_check")) as s:
        rounds = [(s(labels[:5], seeds[:5])[0], slice(0, 5)), (s(labels[5:], seeds[5:])[0], slice(5, None))]
    assert ShardedSampler.launches == launches + 1
    for z2, sl in rounds:
        z1 = one.latents("histodiffusion", f, labels[sl], seeds[sl], draw=d, progress=False)
        # batch composition differs between the runs, so agreement is to float tolerance, not bitwise
        assert torch.allclose(z1, z2, rtol=1e-4, atol=1e-4 * max(1.0, z1.abs().max().item()))


@pytest.mark.slow
def test_changed_synthetic_set_reruns_exactly_its_grid_cells(study, tmp_path):
    """Grid cells are keyed by the content of their inputs: replace one upstream synthetic
    set (as a re-run of stage 04 with other weights would) and only the cells trained on
    it are recomputed; every other cell is reused untouched."""
    import json
    import shutil

    from hdlib.paths import synthetic_set_name
    from hdlib.study.grid_cells import run_downstream_grid

    cfg, overrides, _ = study
    copy = tmp_path / "results"
    shutil.copytree(cfg.results_dir, copy / cfg.study.name)
    mine = load_config(SMOKE, overrides + [f"study.results_root={copy}", "study.progress=false"])
    first = run_downstream_grid(mine)
    assert first.attrs["computed"] == [] and first.attrs["stale_recomputed"] == []

    f, d = min(cfg.downstream.fractions), cfg.downstream.seeds[0]
    req = copy / cfg.study.name / "synthetic" / synthetic_set_name("histodiffusion", f, d) / "request.json"
    state = json.loads(req.read_text())
    state["content_key"] += "-regenerated"
    req.write_text(json.dumps(state))
    grid = copy / cfg.study.name / "grid"
    mtimes = {p.name: p.stat().st_mtime_ns for p in grid.glob("*.json")}

    second = run_downstream_grid(mine)
    expected = sorted(second.loc[(second["fraction"] == f) & (second["seed"] == d) & second["training_set"].isin(
        ["histodiffusion", "histodiffusion_unfiltered"]), "id"].unique())
    assert expected and sorted(second.attrs["stale_recomputed"]) == expected
    assert sorted(second.attrs["computed"]) == expected
    for p in grid.glob("*.json"):
        if p.stem not in expected:
            assert p.stat().st_mtime_ns == mtimes[p.name], p.name


@pytest.mark.slow
def test_export_and_augment_give_imagefolder_datasets(study, tmp_path):
    """`export` writes a diffusers folder plain diffusers loads; `augment` (from the study and
    from the export) writes OUT/<class>/*.png that torchvision's ImageFolder reads, with a
    manifest of every candidate; a second call is a no-op (resumable / reused)."""
    from diffusers import AutoencoderKL, UNet2DModel
    from torchvision.datasets import ImageFolder

    from hdlib.tools.export import augment_dataset, export_study

    cfg, _, _ = study
    exported = export_study(cfg.results_dir, tmp_path / "export")
    AutoencoderKL.from_pretrained(exported / "vae", use_safetensors=True)
    UNet2DModel.from_pretrained(exported / "unet", use_safetensors=True)
    from hdlib.sampling.pipeline import GuidedLatentPipeline

    pipe = GuidedLatentPipeline.from_pretrained(exported, use_safetensors=True)
    assert pipe.unet.config.in_channels == cfg.autoencoder.latent_channels and pipe.vae is not None
    assert list((exported / "latent_classifier").iterdir()) and list((exported / "filter").iterdir())
    for source, out in ((cfg.results_dir, tmp_path / "from_study"), (exported, tmp_path / "from_export")):
        augment_dataset(source, out, per_class=2, filtered=False)
        ds = ImageFolder(out)
        assert ds.classes == sorted(cfg.data.classes) and len(ds) == 2 * len(cfg.data.classes)
        manifest = pd.read_csv(out / "manifest.csv")
        assert {"class", "seed", "guidance_scale", "model", "decision", "score"} <= set(manifest.columns)
        # both sample with the study's chosen sampler (the export used to sample with DDIM whatever it was)
        assert set(manifest["sampler"]) == {f"{cfg.sampling.method}:{cfg.sampling.num_inference_steps}"}
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
        augment_dataset(source, out, per_class=2, filtered=False)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    # --as-study: the export draws the study's own kept set again (its seeds, quota, cap, selection), bit for bit
    recipe = json.loads((exported / "hdlib_export.json").read_text())["study_set"]
    again = augment_dataset(exported, tmp_path / "as_study", None, as_study=True)
    study_set = pd.read_csv(StudyPaths(cfg).synthetic(recipe["name"]) / "manifest.csv")
    kept = study_set[study_set["kept"].astype(bool)]
    theirs = sorted((r["class_name"], hashlib.sha1(Path(r["path"]).read_bytes()).hexdigest()) for _, r in kept.iterrows())
    ours = sorted((p.parent.name, hashlib.sha1(p.read_bytes()).hexdigest()) for p in again.rglob("*.png"))
    assert ours == theirs
    # every candidate, kept or not (the smoke study's tiny filter may keep none): the same seeds, decisions and
    # filter scores, which are computed from the images
    mine = pd.read_csv(again / "manifest.csv")
    cols = ["class_name", "seed", "decision", "distance", "confidence", "nn_distance"]
    assert len(mine) == len(study_set) > 0
    assert mine.rename(columns={"class": "class_name", "score": "distance"})[cols].equals(study_set[cols])
    with pytest.raises(ConfigError, match="--as-study needs an export"):
        augment_dataset(cfg.results_dir, tmp_path / "nope", None, as_study=True)
    filtered = augment_dataset(cfg.results_dir, tmp_path / "filtered", per_class=1)
    manifest = pd.read_csv(filtered / "manifest.csv")
    kept = manifest[manifest["decision"] == "kept"]
    assert len(ImageFolder(filtered, allow_empty=True)) == len(kept)
    assert set(manifest["decision"]) <= {"kept", "over_quota", "wrong_centroid", "low_confidence", "near_copy"}


@pytest.mark.slow
def test_executed_notebooks_carry_no_warning_and_no_machine_path(study):
    """Stage outputs are clean: no warning text (its cause is fixed, not hidden) and no absolute path."""
    import re

    import nbformat

    cfg, _, _ = study
    warning = re.compile(r"\w*Warning:|\[IPKernelApp\]")
    for nb_path in sorted(cfg.results_dir.glob("[0-9][0-9]_*.ipynb")):
        text = nb_path.read_text()
        assert str(ROOT) not in text, nb_path.name  # the repository's machine path (parameters may name tmp dirs)
        nb = nbformat.read(nb_path, as_version=4)
        lines = [line for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"
                 for line in "".join(o.get("text", "")).splitlines() if warning.search(line)]
        assert not lines, f"{nb_path.name}: {lines[:2]}"


@pytest.mark.slow
def test_the_reconstruction_figure_shows_the_measured_reconstructions(study):
    """Stage 01 keeps the reconstructions it measured for its figure instead of encoding and decoding
    the tiles again: per source (and the target) the held-out originals and, row for row, their
    reconstructions, which are within rounding of a fresh pass and score the measured PSNR."""
    from hdlib.models.builders import decode_latents, encode_images, psnr_ssim
    from hdlib.stages.autoencoder import reconstruction_examples
    from hdlib.study.latents import load_autoencoder

    cfg = study[0]
    rows = reconstruction_examples(cfg, n=8)
    measured = {r["source"].removesuffix(" (val)"): r for r in json.loads(
        (cfg.results_dir / "metrics" / "01_autoencoder.json").read_text())["reconstruction"]}
    assert sorted(k for k in rows if not k.endswith(" (recon)")) == sorted(measured)
    vae = load_autoencoder(cfg)
    for name, row in measured.items():
        originals, recon = rows[name], rows[f"{name} (recon)"]
        assert len(originals) == len(recon) == min(8, row["n"]) and recon.dtype == torch.uint8
        again = decode_latents(vae, encode_images(vae, originals, 1.0), 1.0)
        assert (again.int() - recon.int()).abs().max() <= 1
        if row["n"] <= 8:  # every measured tile is shown: the figure's PSNR is the table's
            assert abs(float(psnr_ssim(originals, recon)[0].mean()) - row["psnr_db"]) < 1e-4


@pytest.mark.slow
def test_adaptation_length_pairs_its_lengths_and_leaves_the_study_alone(study, tmp_path):
    """hdlib.tools.adaptation_length on the smoke study: a bad draw fails before any training; the study's own
    length is its own model (linked, not retrained), another length trains in the work folder; every length
    samples the same seeds (paired rows); the study folder is only read."""
    from hdlib.tools import adaptation_length as al

    cfg = study[0]
    out = cfg.results_dir
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"--draws \[99\]"):
        al.run(out, [0, 2], [99], 4, tmp_path)
    assert not (tmp_path / "work").exists()
    own = cfg.diffusion.adapt.max_steps
    table = al.run(out, [0, 2, own], None, 4, tmp_path)
    assert sorted(set(table["adaptation_steps"])) == [0, 2, own]
    lengths = {n: tmp_path / "work" / cfg.study.name / f"steps-{n}" / cfg.study.name for n in (0, 2, own)}
    assert (lengths[own] / "models" / al.ADAPTED).is_symlink()
    assert pd.read_csv(lengths[2] / "models" / al.ADAPTED / "log.csv")["step"].max() == 2
    seeds = {n: {m.parent.name: pd.read_csv(m)[["class_name", "index", "seed"]] for m in (d / "synthetic").glob("*/manifest.csv")}
             for n, d in lengths.items()}
    assert seeds[0] and all(set(s) == set(seeds[0]) for s in seeds.values())
    for name, first in seeds[0].items():
        for n in (2, own):  # candidate k of a class has one seed whatever the denoiser
            both = first.merge(seeds[n][name], on=["class_name", "index"])
            assert len(both) and (both["seed_x"] == both["seed_y"]).all(), (name, n)
    m = json.loads((tmp_path / cfg.study.name / "adaptation_length.json").read_text())
    assert [r["adaptation_steps"] for r in m["per_length"]] == [0, 2, own]
    for fig in ("adaptation_length", "adaptation_length_samples"):
        assert (tmp_path / cfg.study.name / f"{fig}.png").stat().st_size > 1000
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


@pytest.mark.slow
def test_a_changed_objective_retrains_the_adapted_denoiser_and_the_same_one_is_reused(study, tmp_path):
    """The Trainer keys a study model by its task key too (hdlib.study.task_keys): changing diffusion.loss used
    to leave the adapted denoiser of the former loss in place, because its TrainConfig was unchanged."""
    import shutil

    from hdlib.study.train import train_task

    cfg, overrides, _ = study
    own = StudyPaths(cfg).model("denoiser_adapted_target_unlabeled")
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(own, same), shutil.copytree(own, other)
    done = (same / "final" / "COMPLETE").stat().st_mtime_ns
    train_task(cfg, "denoiser_adapted", adaptation="target_unlabeled", out_dir=same)
    assert (same / "final" / "COMPLETE").stat().st_mtime_ns == done  # the same inputs: reused, not retrained
    changed = load_config(SMOKE, [*overrides, f"diffusion.loss={'l2' if cfg.diffusion.loss == 'l1' else 'l1'}"])
    result = train_task(changed, "denoiser_adapted", adaptation="target_unlabeled", out_dir=other)
    assert result.resumed_from_step == 0 and (other / "final" / "COMPLETE").stat().st_mtime_ns != done
