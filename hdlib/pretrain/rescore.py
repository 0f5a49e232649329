"""Score a saved checkpoint of the long pre-training run again, with the judge in use now: after a judge
change (another machine retrained it) an earlier step scored by both judges ties the curve's two scales.

    python -m hdlib.pretrain.rescore params/pretrain_demo.yaml models/pretrain-run/checkpoint/step-00002000 \
        [key=value ...]

Restores the checkpoint into a scratch folder (the Trainer's own resume, which exports its EMA weights),
samples as each judged row of the run does (pretrain.eval_samples, DDIM pretrain.eval_inference_steps, the
same seeds) and prints one CSV row: step, judge, fid, precision, recall, mixture_tv. Needs the run's study
folder (pool, latents) as `make pretrain` left it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ..config import Config, load_config
from ..errors import ConfigError
from ..parallel.threads import torch_threads
from ..study.context import device
from ..study.latent_models import build_denoiser, noise_scheduler
from ..study.train import train_task
from ..training.weights import load_final
from .judges import judge_id
from .recipe import config_with
from .run import encoded_pool
from .samples import sample_images
from .scoring import ProvenanceScorer


def rescore_checkpoint(cfg: Config, checkpoint: Path) -> dict:
    step = int(checkpoint.name.rsplit("-", 1)[-1])
    if not (checkpoint / "COMPLETE").exists():
        raise ConfigError(f"{checkpoint}: not a complete Trainer checkpoint (no COMPLETE marker)")
    p = cfg.pretrain
    with torch_threads(p.threads):  # restored after: a later run in this process keeps its count
        vae, scale = encoded_pool(cfg)
        with tempfile.TemporaryDirectory(prefix="hdlib-rescore-") as tmp:
            shutil.copytree(checkpoint, Path(tmp) / "checkpoints" / checkpoint.name)
            chunk = config_with(cfg, "diffusion.pretrain.max_steps", step)  # resumes at its end: exports the EMA
            train_task(chunk, "denoiser_pretrained", out_dir=tmp, precision_may_change=True, progress=False,
                       keyed=False)
            unet = build_denoiser(cfg)
            load_final(unet, tmp, ema=True)
        imgs = sample_images(unet.eval().requires_grad_(False), noise_scheduler(cfg), vae, scale, p.eval_samples,
                             p.eval_inference_steps, device=device(cfg))
        q = ProvenanceScorer(cfg)(imgs)
        return {"step": step, "judge": judge_id(cfg), **{k: q[k] for k in ("fid", "precision", "recall", "mixture_tv")}}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    row = rescore_checkpoint(load_config(args[0], args[2:]), Path(args[1]))
    print(",".join(row), "\n" + ",".join(str(v) for v in row.values()), sep="")


if __name__ == "__main__":
    main()
