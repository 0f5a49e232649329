"""Downstream image classifier: timm backbone behind a uint8-input wrapper,
histology augmentation, deterministic training with model selection on the
validation split, prediction, feature extraction and evaluation."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ..config import TrainingConfig
from ..data.streaming import StreamingSource, loader
from ..errors import DataError
from ..training.batching import GroupPlan, TensorBatchSource
from ..training.settings import TrainConfig
from ..training.trainer import Trainer
from ..training.weights import load_final
from .metrics import classification_metrics

__all__ = [
    "ClassifierOptions",
    "HistologyAugment",
    "ImageClassifier",
    "build_classifier",
    "evaluate",
    "extract_features",
    "predict",
    "train_classifier",
]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

class ImageClassifier(nn.Module):
    """A timm network (`.net`) that takes images as uint8 (0-255) or float (0-1)
    tensors (N, 3, H, W) and normalises them itself, so callers never do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        # Not persistent: the state dict stays the network's own (with a "net." prefix).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_features(self) -> int:
        return int(self.net.num_features)

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        # channels-last: the layout oneDNN (CPU) and cuDNN (tensor cores) convolve fastest
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate (pre-logits) features, (N, num_features)."""
        return self.net.forward_head(self.net.forward_features(self.normalize(images)), pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))


def _head_prefix(net: nn.Module) -> str:
    """Dotted name of the classifier head module (e.g. 'fc' for ResNet, 'head' for ViT)."""
    head = net.get_classifier()
    for name, module in net.named_modules():
        if module is head:
            return name
    return ""


def _load_backbone_weights(net: nn.Module, path: Path) -> None:
    """Load a local state dict into `net`: strict except for the classifier head,
    which is skipped when its shape differs (another number of classes)."""
    if not path.is_file():
        raise DataError(f"{path}: pretrained weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path}: cannot read pretrained weights ({type(exc).__name__}: {first})") from None
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict) or not state:
        raise DataError(f"{path}: not a state dict")
    # Accept an ImageClassifier's own state dict too.
    if all(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items()}
    import sys

    # timm's per-architecture filter adapts e.g. a ViT's position embedding to another img_size.
    filter_fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, net)
        except Exception:  # noqa: BLE001 - fall back to the unfiltered dict and its clear errors below
            pass
    head = _head_prefix(net)
    own = net.state_dict()

    def is_head(key: str) -> bool:
        return bool(head) and (key == head or key.startswith(head + "."))

    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    bad = [k for k in mismatched if not is_head(k)]
    if bad:
        raise DataError(f"{path}: weights do not fit this architecture: {bad[0]} has shape "
                        f"{tuple(state[bad[0]].shape)}, model expects {tuple(own[bad[0]].shape)}")
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_head(k)]
    unexpected = [k for k in result.unexpected_keys if not is_head(k)]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise DataError(f"{path}: weights do not fit this architecture ({what}, "
                        f"{len(missing)} missing, {len(unexpected)} unexpected keys)")


def build_classifier(name: str = "resnet18", num_classes: int = 9, pretrained_weights: str | Path | None = None,
                     *, seed: int = 0, image_size: int | None = None, **kwargs) -> ImageClassifier:
    """A timm model `name` (never downloaded) wrapped to take uint8 images; weights from a
    local `pretrained_weights` file if given (head may differ). Models with a fixed input size
    (ViTs) are built for `image_size` (e.g. ViT-S/16 on the paper's 256 px tiles).
    Initialisation is seeded by `seed` without touching the caller's RNG."""
    import timm

    if image_size and any(k in name for k in ("vit", "deit", "swin", "eva")):
        kwargs.setdefault("img_size", int(image_size))
    if not timm.is_model(name):
        raise DataError(f"build_classifier: unknown timm model {name!r}")
    if num_classes < 1:
        raise DataError(f"build_classifier: num_classes must be >= 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained_weights:
        _load_backbone_weights(net, Path(pretrained_weights))
    return ImageClassifier(net.to(memory_format=torch.channels_last))


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------

def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


class HistologyAugment(nn.Module):
    """Label-preserving augmentation for H&E tiles, per sample: horizontal and vertical
    flips, 90-degree rotations (square images), and small brightness / contrast /
    saturation / hue jitter (hue as a fraction of a full turn). All randomness comes
    from the `generator` passed to `forward`, so a fixed generator gives fixed output.
    uint8 in -> uint8 out; float (0-1) in -> float out."""

    def __init__(self, flips: bool = True, rotations: bool = True, brightness: float = 0.1,
                 contrast: float = 0.1, saturation: float = 0.1, hue: float = 0.02):
        super().__init__()
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= v < 1:
                raise ValueError(f"HistologyAugment: {name}={v} must be in [0, 1)")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"HistologyAugment: hue={hue} must be in [0, 0.5]")
        self.flips, self.rotations = flips, rotations
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                seeds: torch.Tensor | None = None) -> torch.Tensor:
        """`seeds` (one int64 per image): each image's draws come from its own generator,
        so an image's augmentation does not depend on its batch-mates."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"HistologyAugment: expected (N, 3, H, W) images, got {tuple(images.shape)}")
        n, dev = images.shape[0], images.device
        if seeds is not None:
            draws = torch.stack([torch.rand(8, generator=torch.Generator().manual_seed(int(sd) % 2**63))
                                 for sd in seeds])
        else:
            # Drawn on the CPU generator in a fixed order: same numbers on any device.
            draws = torch.rand(8, n, generator=generator).T
        col = iter(range(8))

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return (draws[:, next(col)] * (hi - lo) + lo).to(dev)

        x = images
        if self.flips:
            hflip, vflip = uniform(0, 1) < 0.5, uniform(0, 1) < 0.5
            x = torch.where(hflip.view(-1, 1, 1, 1), x.flip(-1), x)
            x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
        if self.rotations and x.shape[-1] == x.shape[-2]:
            k = (uniform(0, 4).floor().clamp(max=3)).long()
            base = x
            for j in (1, 2, 3):
                x = torch.where((k == j).view(-1, 1, 1, 1), torch.rot90(base, j, dims=(-2, -1)), x)
        if not (self.brightness or self.contrast or self.saturation or self.hue):
            return x

        is_uint8 = x.dtype == torch.uint8
        y = x.float() / 255.0 if is_uint8 else x.float()
        b = uniform(1 - self.brightness, 1 + self.brightness).view(-1, 1, 1, 1)
        c = uniform(1 - self.contrast, 1 + self.contrast).view(-1, 1, 1, 1)
        s = uniform(1 - self.saturation, 1 + self.saturation).view(-1, 1, 1, 1)
        h = uniform(-self.hue, self.hue) * (2 * math.pi)
        y = (y * b).clamp(0, 1)
        mean = _grayscale(y).mean(dim=(-2, -1), keepdim=True)
        y = (c * y + (1 - c) * mean).clamp(0, 1)
        y = (s * y + (1 - s) * _grayscale(y)).clamp(0, 1)
        if self.hue:
            cos, sin = torch.cos(h), torch.sin(h)
            rot = torch.zeros(n, 3, 3, device=dev)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            m = _YIQ2RGB.to(dev) @ rot @ _RGB2YIQ.to(dev)  # (n, 3, 3)
            y = torch.einsum("nij,njhw->nihw", m, y).clamp(0, 1)
        return (y * 255.0).round().to(torch.uint8) if is_uint8 else y.to(images.dtype)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def _is_dataset(x) -> bool:
    return isinstance(x, torch.utils.data.Dataset) and not isinstance(x, torch.Tensor)


def _check_images(images, labels: torch.Tensor, num_classes: int, name: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype != torch.int64:
        raise DataError(f"{name}: labels must be a 1-D int64 tensor")
    first = images[0][0][None] if _is_dataset(images) and len(images) else images  # streamed: check one item
    if not isinstance(first, torch.Tensor) or first.dtype != torch.uint8 or first.ndim != 4 or first.shape[1] != 3:
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise DataError(f"{name}: expected uint8 images (N, 3, H, W), got {getattr(first, 'dtype', '?')} {shape}")
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{name}: no images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{name}: labels outside [0, {num_classes}) (min {int(labels.min())}, "
                        f"max {int(labels.max())})")


@torch.no_grad()
def _val_scores(model: ImageClassifier, images, labels, num_classes, batch_size, device) -> dict:
    logits = _logits(model, images, batch_size, device, progress=False)
    loss = nn.functional.cross_entropy(logits, labels).item()
    m = classification_metrics(labels, logits.argmax(1), num_classes)
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"]}


@dataclass(frozen=True)
class ClassifierOptions:
    """What `train_classifier` needs beyond the shared training settings (a `TrainingConfig`:
    steps, batch, lr, weight decay, warm-up, clipping, EMA, micro-batch, checkpoint cadence)."""

    num_classes: int
    backbone: str = "resnet18"               # a timm model name
    balanced: bool = False                   # class-balanced real images in every batch
    augment: bool = True                     # HistologyAugment on every training image
    label_smoothing: float = 0.0
    eval_every: int | None = None            # steps between validation scores; None = once per real epoch
    synthetic_images: object = None          # uint8 (N, 3, H, W) tensor or per-item dataset; None = real only
    synthetic_labels: torch.Tensor | None = None
    synthetic_per_real: float = 0.0          # synthetic images per real image in a batch
    synthetic_loss_weight: float = 1.0       # lambda: weight of the synthetic images' mean loss
    pretrained_weights: str | Path | None = None
    num_workers: int = 0                     # DataLoader workers for images streamed from disk
    warmup_fraction: float | None = None     # None = settings.warmup_steps; else round(fraction x steps)
    mixed_precision: str = "no"              # "no" | "bf16" | "fp16"
    device: str = "auto"                     # study.device
    max_memory_gb: float = 0.0               # study.max_memory_gb (hdlib.training.memory_plan)
    progress: bool = True
    out_dir: str | Path | None = None        # checkpoints and logs; None = a temporary folder
    seed: int = 0


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
                     val_labels: torch.Tensor, settings: TrainingConfig,
                     options: ClassifierOptions) -> tuple[ImageClassifier, pd.DataFrame]:
    """Train a timm classifier on uint8 images with the study's one Trainer (accelerate,
    mixed precision, gradient clipping, EMA where set, atomic checkpoints and resume in
    `options.out_dir`; a temporary folder when None), AdamW and warm-up + cosine learning rate.
    `settings` (a TrainingConfig, 0 = off, as in the YAML) gives the steps, batch and
    optimisation; `options` what is particular to a classifier.

    Each step's batch has `settings.batch_size` real images (class-balanced with
    `options.balanced`) and, with synthetic images, round(synthetic_per_real x batch_size)
    more synthetic ones: adding synthetic data never means seeing the real images less. The
    loss of a step is the mean loss over its real images (full weight) + `synthetic_loss_weight`
    (lambda) x the mean loss over its synthetic images, label smoothing and augmentation alike
    in both; without synthetic images (or with lambda = 0, when none are drawn) it is the plain
    mean over the real images. Length: `settings.max_steps`; warm-up: `settings.warmup_steps`,
    or round(options.warmup_fraction x steps) when that is set. The validation split is scored
    every `eval_every` steps (default: once per real epoch) and at the end; the returned model
    is the state with the best validation balanced accuracy (ties: lower validation loss).
    Same arguments and seed give identical weights on the same machine.
    Returns (model in eval mode, history with one row per evaluation)."""
    o = options
    n_syn = _checked_synthetic_per_batch(train_images, train_labels, val_images, val_labels, settings, o)
    n = len(train_images)
    batch = min(settings.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    source, groups = _batch_source(train_images, train_labels, o, n_syn, batch)
    plan = GroupPlan(o.seed, groups, balanced=o.balanced)
    image_size = int(train_images[0][0].shape[-1]) if _is_dataset(train_images) else int(train_images.shape[-1])
    model = build_classifier(o.backbone, o.num_classes, o.pretrained_weights, seed=o.seed, image_size=image_size)
    augmenter = HistologyAugment() if o.augment else None
    loss_fn = _classifier_loss(augmenter, o.label_smoothing, batch, n_syn, o.synthetic_loss_weight)

    def evaluate_fn(m):
        dev = next(m.parameters()).device
        return _val_scores(m, val_images, val_labels, o.num_classes, max(batch, 64), str(dev))

    tmp, out_dir = None, o.out_dir
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hdlib-clf-")
        out_dir = tmp.name
    try:
        history = _train_and_read_history(model, loss_fn, source, plan, evaluate_fn, settings, o, out_dir,
                                          eval_every=max(1, int(o.eval_every or steps_per_epoch)),
                                          steps_per_epoch=steps_per_epoch)
        best = build_classifier(o.backbone, o.num_classes, seed=o.seed, image_size=image_size)
        load_final(best, out_dir, module="best")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return best.eval(), history


def _checked_synthetic_per_batch(train_images, train_labels, val_images, val_labels, settings: TrainingConfig,
                                 o: ClassifierOptions) -> int:
    """Checks the sets and settings before any compute; returns the synthetic images per batch (0: none)."""
    _check_images(train_images, train_labels, o.num_classes, "train_classifier: training set")
    _check_images(val_images, val_labels, o.num_classes, "train_classifier: validation set")
    n_syn = 0
    if o.synthetic_images is not None and len(o.synthetic_images):
        _check_images(o.synthetic_images, o.synthetic_labels, o.num_classes, "train_classifier: synthetic set")
        n_syn = int(round(o.synthetic_per_real * settings.batch_size)) if o.synthetic_per_real > 0 else 0
    if not (math.isfinite(o.synthetic_loss_weight) and o.synthetic_loss_weight >= 0):
        raise ValueError(f"train_classifier: synthetic_loss_weight must be finite and >= 0, "
                         f"got {o.synthetic_loss_weight}")
    if o.synthetic_loss_weight == 0:
        n_syn = 0  # their loss term would be 0: train on the real images alone, exactly as without them
    if settings.batch_size < 1 or settings.max_steps < 1:
        raise ValueError("train_classifier: batch_size and max_steps must be >= 1")
    if len(train_images) < 2:
        raise DataError(f"train_classifier: training set: need at least 2 images, got {len(train_images)}")
    return n_syn


def _batch_source(train_images, train_labels, o: ClassifierOptions, n_syn: int, batch: int):
    """(source of the real then the synthetic items, the batch plan's groups): streamed from disk by
    DataLoader workers when either set is a dataset, else held as tensors."""
    n, synthetic_images, synthetic_labels = len(train_images), o.synthetic_images, o.synthetic_labels
    groups = [(torch.arange(n), train_labels, batch)]
    if n_syn:
        groups.append((torch.arange(n, n + len(synthetic_labels)), synthetic_labels, n_syn))
    if _is_dataset(train_images) or (n_syn and _is_dataset(synthetic_images)):
        parts = [train_images if _is_dataset(train_images) else _Items(train_images, train_labels)]
        if n_syn:  # items carry whether they are synthetic, for the loss
            parts = [_Flagged(parts[0], False),
                     _Flagged(synthetic_images if _is_dataset(synthetic_images)
                              else _Items(synthetic_images, synthetic_labels), True)]
        source = StreamingSource(torch.utils.data.ConcatDataset(parts), o.num_workers,
                                 transform=lambda b: (b[0], torch.as_tensor(b[1], dtype=torch.long),
                                                      *([torch.as_tensor(b[2], dtype=torch.bool)] if n_syn else [])))
    elif n_syn:
        source = TensorBatchSource(torch.cat([train_images, synthetic_images]),
                                   torch.cat([train_labels, synthetic_labels]),
                                   torch.arange(n + len(synthetic_labels)) >= n)
    else:
        source = TensorBatchSource(train_images, train_labels)
    return source, groups


def _train_and_read_history(model, loss_fn, source, plan, evaluate_fn, settings: TrainingConfig,
                            o: ClassifierOptions, out_dir, eval_every: int, steps_per_epoch: int) -> pd.DataFrame:
    """The Trainer's run, and its evaluations with each one's lr, mean training loss since the previous
    and whether it is the selected state."""
    total = settings.max_steps
    warmup = int(settings.warmup_steps) if o.warmup_fraction is None else int(round(o.warmup_fraction * total))
    tc = TrainConfig.from_settings(settings, out_dir=out_dir, seed=int(o.seed), mixed_precision=o.mixed_precision,
                                   progress=o.progress, device=o.device, max_memory_gb=o.max_memory_gb,
                                   max_steps=int(total), global_batch_size=plan.batch,
                                   warmup_steps=min(warmup, total), lr_schedule="cosine",
                                   checkpoints_total_limit=1, log_every=1)
    Trainer(model, loss_fn, source, tc, plan=plan, evaluate=evaluate_fn, eval_every=eval_every,
            select=lambda r: (r["val_balanced_accuracy"], -r["val_loss"])).train()
    history = pd.read_csv(Path(out_dir) / "eval.csv")
    log = pd.read_csv(Path(out_dir) / "log.csv").set_index("step")
    prev = [0] + list(history["step"][:-1])
    history.insert(1, "train_loss", [log.loss.loc[a + 1:b].mean() for a, b in zip(prev, history["step"])])
    history.insert(1, "lr", [log.lr.loc[b] for b in history["step"]])
    selected = json.loads((Path(out_dir) / "final" / "best" / "selection.json").read_text())["step"]
    history["epoch"] = history["step"] / steps_per_epoch
    history["selected"] = history["step"] == selected
    return history.drop(columns=["improved"])


def _classifier_loss(augmenter: HistologyAugment | None, label_smoothing: float, n_real: int,
                     n_synthetic: int = 0, synthetic_loss_weight: float = 1.0):
    """train_classifier's loss_fn(model, batch, sample_seeds) for the Trainer.

    Real-only batches (images, labels): the mean cross-entropy. Mixed batches (images,
    labels, is_synthetic), whose global batch holds `n_real` real and `n_synthetic`
    synthetic images: mean over the real images + `synthetic_loss_weight` x mean over the
    synthetic ones, with the same augmentation and label smoothing. A micro-batch returns
    its share of that loss times the number of micro-batches in the global batch, so the
    Trainer's average over micro-batches (and over processes) is exactly the global loss
    wherever the real/synthetic boundary falls."""

    def loss_fn(m, b, seeds):
        x, y = b[0], b[1]
        if augmenter is not None:
            x = augmenter(x, seeds=seeds)
        logits = m(x)
        if len(b) == 2:
            return nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
        per_image = nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")
        weight = torch.where(b[2], synthetic_loss_weight / max(n_synthetic, 1), 1.0 / n_real)
        return (per_image * weight).sum() * ((n_real + n_synthetic) / len(y))

    return loss_fn


class _Flagged(torch.utils.data.Dataset):
    """Items (image, label) of a dataset as (image, label, synthetic: bool)."""

    def __init__(self, dataset, synthetic: bool):
        self.dataset, self.synthetic = dataset, bool(synthetic)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return item[0], item[1], self.synthetic


class _Items(torch.utils.data.Dataset):
    """In-memory (images, labels) as a per-item dataset, to join a streamed one."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------

def _check_inference_input(images, name: str) -> None:
    if _is_dataset(images):
        return
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"{name}: expected images (N, 3, H, W), got {shape}")


@torch.no_grad()
def _run_batches(fn, model: nn.Module, images, batch_size: int, device: str, progress: bool,
                 desc: str, num_workers: int = 0) -> torch.Tensor:
    """fn over the images in batches: a uint8 tensor, or a dataset streamed from disk."""
    was_training = model.training
    model.eval()
    model.to(device)
    if _is_dataset(images):

        chunks = (x for x, _ in loader(images, batch_size, num_workers, progress=progress, desc=desc))
    else:
        chunks = tqdm(images.split(batch_size), desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        out = [fn(chunk.to(device)).float().cpu() for chunk in chunks]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _logits(model: ImageClassifier, images, batch_size, device, progress=False) -> torch.Tensor:
    return _run_batches(model, model, images, batch_size, device, progress, "predict")


def predict(model: ImageClassifier, images: torch.Tensor, batch_size: int = 256, device: str = "cpu",
            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (N, C) float32 and predicted labels (N,) int64, on the CPU."""
    _check_inference_input(images, "predict")
    probs = _logits(model, images, batch_size, device, progress).softmax(dim=1)
    return probs, probs.argmax(dim=1)


def extract_features(model: ImageClassifier, images: torch.Tensor, batch_size: int = 256, device: str = "cpu",
                     progress: bool = False) -> torch.Tensor:
    """Penultimate (pre-logits) features (N, d) float32 on the CPU (timm
    `forward_features` + `forward_head(pre_logits=True)`; the CLS token for a ViT)."""
    _check_inference_input(images, "extract_features")
    if not isinstance(model, ImageClassifier):
        model = ImageClassifier(model)
    return _run_batches(model.features, model, images, batch_size, device, progress, "features")


def evaluate(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             class_names: Sequence[str] | None = None, batch_size: int = 256, device: str = "cpu",
             progress: bool = False) -> dict:
    """`classification_metrics` of the model on (images, labels), plus the mean cross-entropy `loss`."""
    _check_images(images, labels, num_classes, "evaluate")
    logits = _logits(model, images, batch_size, device, progress)
    metrics = classification_metrics(labels, logits.argmax(1), num_classes, class_names)
    metrics["loss"] = float(nn.functional.cross_entropy(logits, labels))
    return metrics
