"""The judges of pre-training quality and what they measure.

The first judge is a fixed, randomly initialised ResNet-18 (seed 0, never trained). It needs no
labels and no downloaded weights, it is the same for every model it compares and cannot be tuned
toward one of them; embeddings of untrained networks rank generators consistently (Naeem et al.
2020, "Reliable fidelity and diversity metrics for generative models"). Its values are not
comparable with Inception FIDs, only with each other.

The second judge (`hdlib.evaluation.pool_judge`) is the same architecture trained on the pool's provenance;
`pool_judge` trains it once per pool and caches it. `autoencoder_ceiling` is what both judges say
of held-out tiles passed through an autoencoder alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..evaluation.metrics import fid_kid, precision_recall
from ..evaluation.pool_judge import (
    JudgeTraining,
    load_judge,
    provenance_labels,
    save_judge,
    train_pool_judge,
)
from ..models.builders import decode_latents, encode_images
from ..models.pretrained import _sha256
from ..paths import StudyPaths
from ..study.splits import split_images

JUDGE_SEED = 0
JUDGE_IMAGE_SIZE = 128
JUDGE_BLUR_SIGMAS = (0.7, 1.0, 1.5)
POOL_JUDGE_DIR = "pool_judge"


class RandomResNetJudge(torch.nn.Module):
    """uint8 images -> 512-d pooled features of a seeded, untrained ResNet-18."""

    def __init__(self, seed: int = JUDGE_SEED, image_size: int = JUDGE_IMAGE_SIZE):
        super().__init__()
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # zero_init_last=False: with it, every residual branch starts at zero and the
            # untrained net would be little more than its stem.
            self.net = timm.create_model("resnet18", pretrained=False, num_classes=0, zero_init_last=False)
        self.net.eval().requires_grad_(False)
        self.image_size = image_size

    def train(self, mode: bool = True):
        return super().train(False)  # a judge never switches BatchNorm to training mode

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        out = []
        for i in range(0, len(images_uint8), batch_size):
            x = images_uint8[i:i + batch_size].float() / 255.0
            x = torch.nn.functional.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True,
                                                align_corners=False)
            out.append(self.net((x - 0.5) / 0.25).double())
        return torch.cat(out)


def pool_quality(fake_features: torch.Tensor, real_features: torch.Tensor, k: int = 3) -> dict:
    """FID, KID (subsets of up to 100) and precision/recall between two feature sets."""
    n = min(len(fake_features), len(real_features))
    q = fid_kid(real_features.numpy(), fake_features.numpy(), kid_subset_size=min(100, n))
    q.update(precision_recall(real_features.numpy(), fake_features.numpy(), k=k))
    return q


def judge_sensitivity(judge, real_images: torch.Tensor, real_feats: torch.Tensor | None = None,
                      sigmas=JUDGE_BLUR_SIGMAS) -> dict:
    """What the judge can tell apart, on the reference itself: FID between its two halves (the
    noise floor: same distribution) and between a Gaussian-blurred first half and the second
    half (blur by `sigma` px, 5x5 kernel). A judge that only saw colour would rate blurred
    tissue as close to the real thing; blur is the typical failure of small LDMs."""
    import torchvision.transforms.functional as TF

    real_feats = judge(real_images) if real_feats is None else real_feats
    a, b = real_images[0::2], real_feats[1::2]
    out = {"split_half_fid": pool_quality(real_feats[0::2], b)["fid"], "blur_fid": {}}
    for sigma in sigmas:
        blurred = TF.gaussian_blur(a.float(), kernel_size=5, sigma=float(sigma)).round().clamp(0, 255).to(torch.uint8)
        out["blur_fid"][f"{sigma:g}"] = pool_quality(judge(blurred), b)["fid"]
    return out


def matched_size_fid(fake_feats: torch.Tensor, ref_feats: torch.Tensor, n: int, draws: int = 5,
                     seed: int = 0) -> dict:
    """FID of `draws` random subsets of n generated samples against one fixed reference set:
    the same sample sizes as the split-half noise floor, so the two are on one footing
    (FID's bias depends on the sample sizes). Returns mean, sd and the draws."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(draws):
        pick = torch.randperm(len(fake_feats), generator=g)[:n]
        vals.append(fid_kid(ref_feats.numpy(), fake_feats[pick].numpy(), kid_subset_size=min(100, n))["fid"])
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "sd": float(t.std()) if draws > 1 else 0.0, "n": n, "draws": vals}


def pool_judge(cfg: Config, progress: bool = False):
    """The provenance-trained judge of this pool (hdlib.evaluation.pool_judge), trained once on the pool's
    training split and cached in the study's cache, keyed by the pool manifest's content. A long run's
    committed folder (pretrain.committed_run) holds the judge it has been scored with: with the same key it
    is used whenever its training settings match, since a judge retrained on another CPU scores on another scale."""
    paths = StudyPaths(cfg)
    settings = JudgeTraining(epochs=cfg.pretrain.judge_epochs)
    key = {"pool_manifest_sha256": _sha256(paths.manifest("pool")), "training": vars(settings)}
    folder = paths.cache / POOL_JUDGE_DIR
    committed = Path(cfg.pretrain.committed_run) / POOL_JUDGE_DIR if cfg.pretrain.committed_run else None
    # the committed one first: the scale the curve was scored on. Its pool is the run's (the committed run
    # resumes only under the same run key, data settings included), so its training settings must match; the
    # manifest's file hashes may differ by a rendered pixel on another CPU
    if committed is not None and (committed / "judge.json").exists() \
            and json.loads((committed / "judge.json").read_text()).get("key", {}).get("training") == key["training"]:
        return load_judge(committed)
    if (folder / "judge.json").exists() and json.loads((folder / "judge.json").read_text()).get("key") == key:
        return load_judge(folder)
    ds = split_images(cfg, "pool")
    labels = provenance_labels([ds.record(i) for i in range(len(ds))])
    t = time.time()
    judge, log = train_pool_judge(ds, labels, settings, progress=progress)
    info = {"key": key, "train_tiles": len(ds), "steps": log["steps"], "final_loss": log["final_loss"],
            "train_s": time.time() - t}
    save_judge(judge, folder, info)
    return judge, {"classes": judge.classes, **info}


def judge_id(cfg: Config) -> str:
    """The first 12 hex digits of the sha256 of the judge's weights in use (pool_judge): each row of a
    curve names the judge that scored it."""
    paths = StudyPaths(cfg)
    for place in (Path(cfg.pretrain.committed_run) / POOL_JUDGE_DIR if cfg.pretrain.committed_run else None,
                  paths.cache / POOL_JUDGE_DIR):
        if place is not None and (place / "judge.safetensors").exists():
            return _sha256(place / "judge.safetensors")[:12]
    return ""


def tissue_group(label: str) -> str:
    """A provenance class without its stain style ('procedural_dark:LYM' -> 'LYM'); a real source as is."""
    return label.split(":", 1)[1] if ":" in label else label


@torch.no_grad()
def autoencoder_ceiling(vae, scale, real, real_f, truth, judge, random_judge, random_real, device: str = "cpu") -> dict:
    """Held-out tiles through the autoencoder alone: FID of reconstructions of one half against the
    other real half (both judges), and per tissue group how often the judge still calls a
    reconstruction what its original was. No denoiser can do better than its autoencoder."""
    rec = decode_latents(vae, encode_images(vae, real, scale, batch_size=64, device=device), scale, batch_size=64,
                         device=device)
    f, c = judge.features_and_calls(rec)
    want = [tissue_group(t) for t in truth]
    got = [tissue_group(judge.classes[i]) for i in c.tolist()]
    per_group = {gname: float(np.mean([a == gname for a, w in zip(got, want) if w == gname]))
                 for gname in sorted(set(want))}
    return {"fid": pool_quality(f[0::2], real_f[1::2])["fid"],
            "random_judge_fid": pool_quality(random_judge(rec)[0::2], random_real[1::2])["fid"],
            "tissue_kept": float(np.mean([a == w for a, w in zip(got, want)])), "tissue_kept_per_group": per_group}
