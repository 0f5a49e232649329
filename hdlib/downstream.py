"""Downstream image classifier: timm backbone behind a uint8-input wrapper,
histology augmentation, deterministic training with model selection on the
validation split, prediction, feature extraction and evaluation."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError
from .metrics import classification_metrics

__all__ = [
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
        return (x - self.mean) / self.std

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
                     *, seed: int = 0, **kwargs) -> ImageClassifier:
    """A timm model `name` (never downloaded; ViTs take `img_size=`) wrapped to take uint8
    images; weights from a local `pretrained_weights` file if given (head may differ).
    Initialisation is seeded by `seed` without touching the caller's RNG."""
    import timm

    if not timm.is_model(name):
        raise DataError(f"build_classifier: unknown timm model {name!r}")
    if num_classes < 1:
        raise DataError(f"build_classifier: num_classes must be >= 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained_weights:
        _load_backbone_weights(net, Path(pretrained_weights))
    return ImageClassifier(net)


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

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"HistologyAugment: expected (N, 3, H, W) images, got {tuple(images.shape)}")
        n, dev = images.shape[0], images.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            # Drawn on the CPU generator in a fixed order: same numbers on any device.
            return (torch.rand(n, generator=generator) * (hi - lo) + lo).to(dev)

        x = images
        if self.flips:
            hflip, vflip = uniform(0, 1) < 0.5, uniform(0, 1) < 0.5
            x = torch.where(hflip.view(-1, 1, 1, 1), x.flip(-1), x)
            x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
        if self.rotations and x.shape[-1] == x.shape[-2]:
            k = torch.randint(0, 4, (n,), generator=generator).to(dev)
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

def _check_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"{name}: expected uint8 images (N, 3, H, W), got "
                        f"{getattr(images, 'dtype', '?')} {shape}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype != torch.int64:
        raise DataError(f"{name}: labels must be a 1-D int64 tensor")
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{name}: no images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{name}: labels outside [0, {num_classes}) (min {int(labels.min())}, "
                        f"max {int(labels.max())})")


def _batch_indices(labels: torch.Tensor, batch_size: int, num_classes: int, balanced: bool,
                   generator: torch.Generator):
    """Endless stream of index batches: shuffled epochs (plain) or class-balanced
    draws with replacement (balanced). Every batch has exactly `batch_size` items,
    so BatchNorm never sees a batch of one."""
    n = len(labels)
    if balanced:
        counts = torch.bincount(labels, minlength=num_classes).double()
        weights = (1.0 / counts.clamp(min=1))[labels]
        while True:
            yield torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    buffer = torch.empty(0, dtype=torch.long)
    while True:
        while len(buffer) < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


@torch.no_grad()
def _val_scores(model: ImageClassifier, images, labels, num_classes, batch_size, device) -> dict:
    logits = _logits(model, images, batch_size, device, progress=False)
    loss = nn.functional.cross_entropy(logits, labels).item()
    m = classification_metrics(labels, logits.argmax(1), num_classes)
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"]}


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
                     val_labels: torch.Tensor, *, backbone: str = "resnet18", num_classes: int,
                     epochs: int | None = None, max_steps: int | None = None, batch_size: int = 64,
                     lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int | None = None,
                     label_smoothing: float = 0.0, seed: int = 0, device: str = "cpu", augment: bool = True,
                     balanced: bool = False, eval_every: int | None = None,
                     pretrained_weights: str | Path | None = None, model_kwargs: dict | None = None,
                     progress: bool = True) -> tuple[ImageClassifier, pd.DataFrame]:
    """Train a timm classifier on uint8 images with AdamW and a warm-up + cosine schedule.

    Length: `max_steps` optimiser steps, or `epochs` passes over the training set.
    The validation split is scored every `eval_every` steps (default: once per epoch)
    and at the end; the returned model is the state with the best validation balanced
    accuracy (ties: lower validation loss). `warmup_steps` defaults to 5% of the steps.
    Same arguments and seed give identical weights on the CPU.
    Returns (model in eval mode, history with one row per evaluation)."""
    _check_images(train_images, train_labels, num_classes, "train_classifier: training set")
    _check_images(val_images, val_labels, num_classes, "train_classifier: validation set")
    if (epochs is None) == (max_steps is None):
        raise ValueError("train_classifier: give exactly one of epochs or max_steps")
    if batch_size < 1 or (epochs is not None and epochs < 1) or (max_steps is not None and max_steps < 1):
        raise ValueError("train_classifier: batch_size, epochs and max_steps must be >= 1")

    n = len(train_images)
    if n < 2:
        raise DataError(f"train_classifier: training set: need at least 2 images, got {n}")
    batch = min(batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    eval_every = max(1, int(eval_every or steps_per_epoch))
    warmup = int(round(0.05 * total)) if warmup_steps is None else int(warmup_steps)

    from diffusers.optimization import get_cosine_schedule_with_warmup

    model = build_classifier(backbone, num_classes, pretrained_weights, seed=seed, **(model_kwargs or {}))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(warmup, total), num_training_steps=total)
    augmenter = HistologyAugment() if augment else None
    g_data = torch.Generator().manual_seed(seed)
    g_aug = torch.Generator().manual_seed(seed + 1_000_003)
    batches = _batch_indices(train_labels, batch, num_classes, balanced, g_data)

    rows, best, best_state = [], None, None
    running, seen = 0.0, 0
    # Anything inside timm that still uses the global RNG (dropout, drop-path) is
    # seeded here, in a fork, so the caller's RNG state is not changed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(range(1, total + 1), desc=f"train {backbone}", disable=not progress, leave=False)
        for step in bar:
            model.train()
            idx = next(batches)
            x = train_images[idx].to(device)
            y = train_labels[idx].to(device)
            if augmenter is not None:
                x = augmenter(x, generator=g_aug)
            loss = nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            lr_used = sched.get_last_lr()[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            seen += 1
            if step % eval_every == 0 or step == total:
                model.eval()
                scores = _val_scores(model, val_images, val_labels, num_classes, max(batch, 64), device)
                key = (scores["val_balanced_accuracy"], -scores["val_loss"])
                improved = best is None or key > best
                if improved:
                    best = key
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                rows.append({"step": step, "epoch": step / steps_per_epoch, "lr": lr_used,
                             "train_loss": running / seen, **scores, "is_best": improved})
                running, seen = 0.0, 0
                bar.set_postfix(val_bacc=f"{scores['val_balanced_accuracy']:.3f}")
        bar.close()

    model.load_state_dict(best_state)
    history = pd.DataFrame(rows)
    # Mark only the finally selected row (earlier "is_best" rows were improvements at the time).
    history["selected"] = False
    history.loc[history.index[history["is_best"]][-1], "selected"] = True
    history = history.drop(columns="is_best")
    return model.eval(), history


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------

def _check_inference_input(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"{name}: expected images (N, 3, H, W), got {shape}")


@torch.no_grad()
def _run_batches(fn, model: nn.Module, images: torch.Tensor, batch_size: int, device: str, progress: bool,
                 desc: str) -> torch.Tensor:
    was_training = model.training
    model.eval()
    model.to(device)
    out = [fn(chunk.to(device)).float().cpu()
           for chunk in tqdm(images.split(batch_size), desc=desc, disable=not progress, leave=False)]
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
