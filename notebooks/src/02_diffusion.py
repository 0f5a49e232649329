# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 - Unconditional latent diffusion
#
# The unconditional latent denoiser (`diffusers.UNet2DModel`, epsilon prediction, the paper's noise schedule, L1 loss, EMA) learns what histology looks like from the unlabeled pool, never from the target. When `pretrained.path` holds a denoiser, that model is loaded instead of trained. It is then adapted to the target as `diffusion.adaptations` asks (`none`: used as is; `labeled`: fine-tuned on the labeled fraction; `target_unlabeled`: fine-tuned on all target training images, without their labels). For the ablation, a denoiser of the same architecture is trained from scratch on the labeled fraction only.

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
import torch
from IPython.display import Markdown, display

from hdlib.evaluation import plots
from hdlib.io import atomic_write_csv
from hdlib.paths import StudyPaths, model_name
from hdlib.stages.common import setup_notebook
from hdlib.stages.diffusion import per_source_realism, unconditional_samples
from hdlib.study import train
from hdlib.study.context import write_metrics
from hdlib.study.latent_models import uses_pretrained_unet
from hdlib.study.latents import training_log
from hdlib.study.splits import (
    first_draw,
    grid_fractions,
    load_split_images,
    smallest_fraction,
    split_images,
)

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %% [markdown]
# ## Which denoiser this study uses, and training

# %%
fractions = grid_fractions(cfg)
if uses_pretrained_unet(cfg):
    display(Markdown(f"**Pre-trained unconditional denoiser, loaded from `{cfg.pretrained.path}`** "
                     "(not trained in this study)."))
else:
    train.launch_task(cfg, params_file, overrides, "denoiser_pretrained")
    display(Markdown("**Unconditional denoiser pre-trained in this study** on the unlabeled pool "
                     "(settings: `diffusion`, `diffusion.pretrain`)."))
f0, d0 = smallest_fraction(cfg), first_draw(cfg)
# adaptation candidates at the smallest fraction and first draw: stage 04 chooses on validation
# (and trains the chosen adaptation for the other fractions and draws)
if "labeled" in cfg.diffusion.adaptations:
    train.launch_task(cfg, params_file, overrides, "denoiser_adapted", fraction=f0, adaptation="labeled", draw=d0)
if "target_unlabeled" in cfg.diffusion.adaptations:
    train.launch_task(cfg, params_file, overrides, "denoiser_adapted", adaptation="target_unlabeled")
# the from-scratch ablation (when the grid uses it): smallest fraction, every label draw
needed = set(cfg.downstream.training_sets) | set(cfg.downstream.ratio_sweep_sets)
if "scratch" in needed:
    for d in cfg.downstream.seeds:
        train.launch_task(cfg, params_file, overrides, "denoiser_scratch", fraction=f0, draw=d)

# %% [markdown]
# ## Figure: denoiser training loss
#
# Training loss (log scale, smoothed) of each denoiser trained here, at the smallest label fraction, named as in `models/`: `denoiser_pretrained` (pool), `denoiser_adapted_*` (fine-tuned on the target), `denoiser_scratch_*` (labeled fraction only). Diffusion losses are noisy and fall slowly: compare the level reached rather than single steps. **Expect** the adapted model to start low (it starts from the pre-trained weights); a from-scratch model with very few images can reach a low loss by memorising them, which is not a sign of quality (see the samples below).

# %%
models = ["denoiser_pretrained"]
if "labeled" in cfg.diffusion.adaptations:
    models.append(model_name("denoiser_adapted", f0, "labeled", draw=d0))
if "target_unlabeled" in cfg.diffusion.adaptations:
    models.append(model_name("denoiser_adapted", adaptation="target_unlabeled"))
if "scratch" in needed:
    models.append(model_name("denoiser_scratch", f0, draw=d0))
trained_here = [m for m in models if not (m == "denoiser_pretrained" and uses_pretrained_unet(cfg))]
fig = plots.loss_curves({m: training_log(cfg, m) for m in trained_here}, title="Latent denoiser training loss")
plots.save(fig, cfg, "diffusion_loss")

# %% [markdown]
# ## Figure: unconditional samples
#
# Each row shows ten samples of one model, from the same random seeds and without any class guidance, and the last row real target training images for comparison. **How to read:** look for realistic tissue architecture (nuclei with chromatin texture, intact cell borders, coherent glands and stroma) and for the stain style of each model's training data. **Good:** the pre-trained model gives varied, realistic histology in the pool's stain; adapted models move towards the target's look; a from-scratch model trained on few images tends to give blurry tiles or near-copies of its training images.

# %%
n = cfg.diffusion.preview_samples
samples = {m: images for m, (_, images) in unconditional_samples(cfg, models, n, "uncond").items()}
pick = torch.randperm(len(split_images(cfg, "target_train")), generator=torch.Generator().manual_seed(cfg.study.seed))[:n]
samples["real target"] = load_split_images(cfg, "target_train", pick.numpy())[0]
fig = plots.image_rows(samples, n=n, title="Unconditional samples (same seeds in every row)")
plots.save(fig, cfg, "diffusion_samples")

# %% [markdown]
# ## Table: which data each model imitates
#
# Frechet distance between simple latent statistics (per-channel mean, std and gradient energy) of `diffusion.realism_samples` samples of each model (rows) and of each real source (columns: the pool sources and the target). Lower is closer. **How to read:** in each row, the smallest value names the data the model's samples resemble most; adapted models should be closer to `target` than the pre-trained one. A coarse check, not an image-quality metric (FID and KID follow in 06_quality).

# %%
n_check = cfg.diffusion.realism_samples
check = {m: z for m, (z, _) in unconditional_samples(cfg, models, n_check, "realism").items()}
realism = per_source_realism(cfg, check).pivot(index="model", columns="source", values="frechet").round(3)
atomic_write_csv(realism.reset_index(), paths.table("diffusion_realism"))
write_metrics(cfg, "02_diffusion", {"realism_frechet": realism.to_dict(),
                                    "pretrained_denoiser": uses_pretrained_unet(cfg)})
realism
