"""A second judge of pre-training quality: a network trained on the pool's own provenance.

The card's first judge (`pretrain.RandomResNetJudge`) is an untrained ResNet-18. It needs no
labels and nothing to download and cannot be tuned toward a model, but its features are mostly
colour and low-level texture. This judge is the same architecture trained from scratch, on the
pre-training pool's TRAINING tiles only, to tell those tiles apart by what made them:

* a procedural tile by its stain style and the tissue class the generator drew for it (not
  stored anywhere: re-derived from the generator's seed, `demo.pool_tile_class`);
* any other tile (a real H&E wheel image, a user's folder or slide) by its source.

Like Inception for ImageNet FIDs, its features then weigh what tells tissue types apart. It
never sees the labeled target (its stain style is held out of the pool), so it needs none of the
target's labels, and the holdout it judges against is new to it. It reads three things:

* quality: FID/KID/precision/recall in its feature space, also at the split-half's sample sizes;
* mixture: how often each provenance class turns up among a model's samples vs among the real
  held-out tiles (both as the judge calls them, so its own errors cancel), and the total
  variation distance between the two mixtures;
* copying: for each sample, whether its nearest neighbour (judge features) among an equal number
  of the model's own training tiles and of held-out tiles is a training tile; 50% means the
  model is as close to tiles it never saw as to the ones it learnt from.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import TrainingConfig
from ..data.streaming import StreamingSource
from ..demo import pool_tile_class
from ..errors import DataError
from ..io import atomic_path, atomic_write_json
from ..training.settings import TrainConfig
from ..training.trainer import Trainer
from ..training.weights import load_final
from .downstream import HistologyAugment

JUDGE_SEED = 0


def provenance_labels(records) -> list[str]:
    """'source:CLASS' for procedural demo tiles, the record's source name for any other tile."""

    out = []
    for r in records:
        cls = pool_tile_class(r.path)
        out.append(f"{r.source}:{cls}" if cls else r.source)
    return out


class PoolJudge(torch.nn.Module):
    """uint8 tiles -> provenance logits / 512-d pooled features of a ResNet-18 (trained by `train_pool_judge`)."""

    def __init__(self, classes: list[str], seed: int = JUDGE_SEED):
        super().__init__()
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = timm.create_model("resnet18", pretrained=False, num_classes=len(classes))
        self.classes = list(classes)

    @staticmethod
    def _prep(x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float() / 255.0 - 0.5) / 0.25

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.net(self._prep(x_uint8))

    @torch.no_grad()
    def features_and_calls(self, images_uint8: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 [N, 512] pooled features, [N] predicted class index), in eval mode."""
        was = self.training
        self.eval()
        feats, calls = [], []
        for i in range(0, len(images_uint8), batch_size):
            h = self.net.forward_head(self.net.forward_features(self._prep(images_uint8[i:i + batch_size])),
                                      pre_logits=True)
            feats.append(h.double())
            calls.append(self.net.get_classifier()(h).argmax(1))
        self.train(was)
        if not feats:
            return torch.empty(0, self.net.num_features, dtype=torch.float64), torch.empty(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(calls)


# A random flip / 90-degree rotation per tile (tissue has no up or left), drawn from the tile's sample seed.
_DIHEDRAL = HistologyAugment(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


@dataclass
class JudgeTraining:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.15   # linear warm-up over this share of the steps, then cosine to 0
    seed: int = JUDGE_SEED


class _Provenance(torch.utils.data.Dataset):
    """Items (uint8 tile, provenance class index) of a tile dataset."""

    def __init__(self, dataset, y: torch.Tensor):
        self.dataset, self.y = dataset, y

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[int(i)][0], int(self.y[i])


def _judge_loss(model, batch, seeds):
    return torch.nn.functional.cross_entropy(model(_DIHEDRAL(batch[0], seeds=seeds)), batch[1])


def train_pool_judge(dataset, labels: list[str], settings: JudgeTraining = JudgeTraining(),
                     progress: bool = False, num_workers: int = 0) -> tuple[PoolJudge, dict]:
    """Train a PoolJudge on `dataset` (ManifestImages-like: item -> (uint8 tile, _)) with the
    study's one Trainer (seeded epoch permutations, per-tile flips / rotations, AdamW, warm-up +
    cosine lr); `labels[i]` is tile i's provenance. `settings.epochs` x (tiles // batch) steps.
    Returns (judge on the CPU in eval mode, training log)."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"pool judge: the pool has one provenance class only ({classes}); nothing to learn")
    if len(labels) != len(dataset):
        raise ValueError(f"pool judge: {len(labels)} labels for {len(dataset)} tiles")
    idx = {c: i for i, c in enumerate(classes)}
    y_all = torch.tensor([idx[c] for c in labels])
    n_batches = len(dataset) // settings.batch_size or 1
    total = settings.epochs * n_batches
    train = TrainingConfig(max_steps=total, batch_size=min(settings.batch_size, len(dataset)), lr=settings.lr,
                           weight_decay=settings.weight_decay,
                           warmup_steps=round(settings.warmup_fraction * total), grad_clip=0.0,
                           checkpointing_steps=total)
    source = StreamingSource(_Provenance(dataset, y_all), num_workers)
    with tempfile.TemporaryDirectory(prefix="hdlib-judge-") as out_dir:
        tc = TrainConfig.from_settings(train, out_dir=out_dir, seed=settings.seed, progress=progress,
                                       lr_schedule="cosine", checkpoints_total_limit=1, log_every=1)
        Trainer(PoolJudge(classes, settings.seed), _judge_loss, source, tc).train()
        judge = load_final(PoolJudge(classes, settings.seed), out_dir)
        rows = pd.read_csv(Path(out_dir) / "log.csv")
    log = [{"step": int(s), "epoch": (int(s) - 1) // n_batches, "loss": float(v)}
           for s, v in zip(rows["step"], rows["loss"])]
    return judge.eval(), {"steps": total, "final_loss": float(np.mean([r["loss"] for r in log[-n_batches:]])),
                          "log": log}


def save_judge(judge: PoolJudge, folder: Path, info: dict) -> None:
    """safetensors weights + json (classes, info), each written atomically."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in judge.state_dict().items()}
    with atomic_path(folder / "judge.safetensors") as tmp:
        Path(tmp).write_bytes(save(state))
    atomic_write_json(folder / "judge.json", {"classes": judge.classes, **info})


def load_judge(folder: Path) -> tuple[PoolJudge, dict]:
    from safetensors.torch import load_file

    info = json.loads((folder / "judge.json").read_text())
    judge = PoolJudge(info["classes"])
    judge.load_state_dict(load_file(str(folder / "judge.safetensors")))
    return judge.eval(), info


def mixture(calls: torch.Tensor, n_classes: int) -> np.ndarray:
    """Share of each class among the calls."""
    if len(calls) == 0:
        return np.zeros(n_classes)
    return np.bincount(calls.numpy(), minlength=n_classes) / len(calls)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def copying_rate(sample_feats: torch.Tensor, train_feats: torch.Tensor, unseen_feats: torch.Tensor) -> float:
    """Share of samples whose nearest neighbour among (train tiles + as many unseen tiles) is a
    training tile; the two sets must be the same size. 0.5 = no preference for what was learnt."""
    if len(train_feats) != len(unseen_feats) or len(train_feats) == 0:
        raise ValueError(f"copying_rate: need equal, non-empty reference sets, got {len(train_feats)} "
                         f"and {len(unseen_feats)}")
    d_train = torch.cdist(sample_feats, train_feats).min(1).values
    d_unseen = torch.cdist(sample_feats, unseen_feats).min(1).values
    return float((d_train < d_unseen).double().mean())
