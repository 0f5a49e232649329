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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .demo import pool_tile_class
from .errors import DataError
from .io import atomic_path, atomic_write_json

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


def _dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random flip / 90-degree rotation per tile: tissue has no up or left."""
    k = torch.randint(0, 4, (len(x),), generator=g)
    f = torch.randint(0, 2, (len(x),), generator=g)
    return torch.stack([torch.rot90(t.flip(-1) if fi else t, int(ki), (-2, -1)) for t, ki, fi in zip(x, k, f)])


@dataclass
class JudgeTraining:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = JUDGE_SEED


def train_pool_judge(dataset, labels: list[str], settings: JudgeTraining = JudgeTraining(),
                     progress: bool = False) -> tuple[PoolJudge, dict]:
    """Train a PoolJudge on `dataset` (ManifestImages-like: item -> (uint8 tile, _)) streamed in
    shuffled batches; `labels[i]` is tile i's provenance. Returns (judge, training log)."""
    from tqdm.auto import tqdm

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"pool judge: the pool has one provenance class only ({classes}); nothing to learn")
    if len(labels) != len(dataset):
        raise ValueError(f"pool judge: {len(labels)} labels for {len(dataset)} tiles")
    idx = {c: i for i, c in enumerate(classes)}
    y_all = torch.tensor([idx[c] for c in labels])
    judge = PoolJudge(classes, settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=settings.lr, weight_decay=1e-4)
    n_batches = len(dataset) // settings.batch_size or 1
    total = settings.epochs * n_batches
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total, pct_start=0.15)
    judge.train()
    log, step = [], 0
    bar = tqdm(total=total, desc="pool judge", disable=not progress, leave=False)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(dataset), generator=g)
        for b in range(n_batches):
            rows = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            x = _dihedral(torch.stack([dataset[int(r)][0] for r in rows]), g)
            loss = torch.nn.functional.cross_entropy(judge(x), y_all[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            value = loss.item()
            log.append({"step": step, "epoch": epoch, "loss": value})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    judge.eval()
    return judge, {"steps": step, "final_loss": float(np.mean([r["loss"] for r in log[-n_batches:]])),
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
