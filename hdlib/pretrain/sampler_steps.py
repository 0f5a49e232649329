"""How an exported model's judged quality depends on how it is sampled: DDIM step count and eta, scored like
the run's rows (the run's judge, holdout and sample seeds, pretrain.eval_samples samples). It separates what
the sampler costs from what the network lacks before a target is blamed on training.

    python -m hdlib.pretrain.sampler_steps params/pretrain_demo.yaml [--model models/demo-pool]
        [--steps 25 50 100 250] [--eta 1 0] [key=value ...]

Rows (the model's pin, steps, eta, samples, the judge's figures) go to metrics/pretrain_sampler_steps.csv and
are mirrored into pretrain.committed_run/metrics/; a (model, steps, eta) already scored is skipped, so a stop
loses one row at most. Needs the run's study folder (pool, latents) as `make pretrain` left it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..config import Config, load_config
from ..io import atomic_write_csv
from ..models.pretrained import folder_sha256, load_scheduler, load_unet, load_vae, read_latent_info, verify
from ..parallel.threads import torch_threads
from ..study.context import device
from .judges import judge_id
from .resume import _copy_file, committed_rows
from .run import encoded_pool
from .samples import sample_images
from .scoring import ProvenanceScorer

CURVE = "pretrain_sampler_steps.csv"


def todo(rows: list[dict], pin: str, steps: list[int], etas: list[float]) -> list[tuple[int, float]]:
    """The (steps, eta) settings of this model not yet scored, in the order asked."""
    done = {(r["pin"], int(r["ddim_steps"]), float(r["eta"])) for r in rows}
    return [(s, e) for s in steps for e in etas if (pin, int(s), float(e)) not in done]


def score_sampler_settings(cfg: Config, model_dir: str, steps: list[int], etas: list[float]) -> pd.DataFrame:
    """Score the exported model at every (steps, eta); returns this model's rows."""
    verify(model_dir)  # one line before any compute
    p = cfg.pretrain
    with torch_threads(p.threads):  # restored after: a later run in this process keeps its count
        encoded_pool(cfg)  # the pool and its holdout, as the run's rows used
        pin = folder_sha256(model_dir)[:16]
        path = committed_rows(cfg, CURVE)
        rows = pd.read_csv(path).to_dict("records") if path.exists() else []
        unet, sched, vae = load_unet(model_dir), load_scheduler(model_dir), load_vae(model_dir)
        scale = read_latent_info(model_dir)["scaling_factor"]
        scorer = ProvenanceScorer(cfg) if todo(rows, pin, steps, etas) else None
        for n_steps, eta in todo(rows, pin, steps, etas):
            imgs = sample_images(unet, sched, vae, scale, p.eval_samples, n_steps, device=device(cfg), eta=eta,
                                 progress=cfg.study.progress)
            q = scorer(imgs)
            rows.append({"model": str(model_dir), "pin": pin, "ddim_steps": n_steps, "eta": eta,
                         "samples": p.eval_samples, **q, "judge": judge_id(cfg)})
            atomic_write_csv(pd.DataFrame(rows), path)
            if p.committed_run:
                _copy_file(path, Path(p.committed_run) / "metrics" / CURVE)
            print(f"[sampler] {model_dir} DDIM {n_steps} eta {eta:g}: judge FID {q['fid']:.2f} P {q['precision']:.3f} "
                  f"R {q['recall']:.3f} mixture TV {q['mixture_tv']:.3f}", flush=True)
        return pd.DataFrame([r for r in rows if r["pin"] == pin])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hdlib.pretrain.sampler_steps", description=__doc__.split("\n\n")[0])
    ap.add_argument("params")
    ap.add_argument("--model", default="", help="exported model folder (default: pretrain.export_dir)")
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 250])
    ap.add_argument("--eta", type=float, nargs="+", default=[1.0])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    cfg = load_config(a.params, a.overrides)
    rows = score_sampler_settings(cfg, a.model or cfg.pretrain.export_dir, a.steps, a.eta)
    print(rows[["ddim_steps", "eta", "fid", "precision", "recall", "mixture_tv"]].to_string(index=False))


if __name__ == "__main__":
    main()
