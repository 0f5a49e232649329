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
# # 01 - Autoencoder
#
# The autoencoder compresses each H&E tile into a small latent image; the diffusion model works in this latent space. With `pretrained.path` set, a pre-trained autoencoder (diffusers format) is loaded, not trained. Otherwise the KL-regularised autoencoder (`diffusers.AutoencoderKL`) is trained here on the unlabeled pool only, with L1 + (1 - SSIM) + a small KL term (the paper used LPIPS and a patch discriminator; LPIPS weights cannot be downloaded here, so SSIM is the structural term). Latents are scaled to unit variance: the scale factor is 1/std of the pool latents, or the pre-trained model's own.

# %% tags=["parameters"]
# The study's parameter file, and key=value overrides such as "downstream.seeds=[0,1]".
params_file = "params/default.yaml"
overrides = []

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from hdlib.evaluation import plots
from hdlib.paths import StudyPaths
from hdlib.stages.autoencoder import autoencoder_stage, reconstruction_examples
from hdlib.stages.common import setup_notebook
from hdlib.study import train
from hdlib.study.latents import latent_store, training_log

cfg = setup_notebook(params_file, overrides)  # prints where results go and the device
paths = StudyPaths(cfg)

# %% [markdown]
# ## Which autoencoder this study uses

# %%
if cfg.pretrained.path:
    display(Markdown(f"**Pre-trained autoencoder, loaded from `{cfg.pretrained.path}`** (not trained in this "
                     "study; its latent scale factor comes with it)."))
else:
    train.launch_task(cfg, params_file, overrides, "autoencoder")
    display(Markdown("**Autoencoder trained in this study** on the unlabeled pool (settings: `autoencoder`)."))

# %% [markdown]
# ## Table: latent space summary
#
# Every split is encoded once, streaming, into a memory-mapped cache of posterior means and standard deviations (float16; training draws a fresh posterior sample each time). The latent shape (channels x height x width) says how much each tile is compressed; the scaled latents should have mean near 0 and std near 1. The PSNR is averaged over the held-out pool tiles.

# %%
metrics = autoencoder_stage(cfg)
pd.Series({"latent shape (C x H x W)": " x ".join(map(str, metrics["latent_shape"])),
           "latent scale factor": round(metrics["scale_factor"], 4),
           "scaled latent mean": round(metrics["scaled_latent_mean"], 3),
           "scaled latent std": round(metrics["scaled_latent_std"], 3),
           "held-out pool PSNR (dB)": round(metrics["heldout_pool_psnr_db"], 2)}, name="value").to_frame()

# %% [markdown]
# ## Table: reconstruction quality on held-out tiles
#
# One row per pool source (tiles held out of training) and one for the target's validation images (never used to train the autoencoder, possibly another stain). PSNR (dB) measures pixel fidelity and SSIM (0 to 1) structural fidelity; higher is better for both. **Good:** the target row is about as good as the pool rows, i.e. the autoencoder generalises to the target's stain; a much worse target row means generated target images will be blurred or colour-shifted however good the diffusion model is.

# %%
pd.DataFrame(metrics["reconstruction"]).round(3)

# %% [markdown]
# ## Figure: autoencoder training loss
#
# Only when the autoencoder was trained here. Training loss (log scale, smoothed) against the optimisation step. **Good:** a steady decrease that flattens towards the end; a curve still falling steeply means more steps (`autoencoder.train.max_steps`) would help.

# %%
if cfg.pretrained.path:
    print("pre-trained autoencoder: no training loss to show")
else:
    fig = plots.loss_curves({"autoencoder": training_log(cfg, "autoencoder")}, title="Autoencoder training loss")
    plots.save(fig, cfg, "autoencoder_loss")

# %% [markdown]
# ## Figure: originals and their reconstructions
#
# Rows come in pairs: held-out tiles of a source (or of the target), then the same tiles after encoding and decoding (`(recon)`). **How to read:** compare each tile with the one below it. **Good:** nuclei, cell borders, glands and stroma fibres are preserved and colours match; some blur of fine chromatin texture is the usual price of the compression.

# %%
fig = plots.image_rows(reconstruction_examples(cfg, n=8), n=8, title="Held-out tiles and their reconstructions")
plots.save(fig, cfg, "autoencoder_reconstructions")

# %% [markdown]
# ## Figure: distribution of the latent values
#
# Histogram of the scaled latent values of the pool, one line per latent channel (the legend gives each channel's std), with the standard normal N(0, 1) dotted. The diffusion model assumes latents of about unit scale. **Good:** every channel centred near 0 with a spread close to 1; a channel much narrower than the others carries little information.

# %%
store = latent_store(cfg)
sample = store.means("pool", np.arange(min(4096, len(store.mean("pool")))))
fig = plots.latent_histograms(sample, title="Scaled pool latents per channel (up to 4096 tiles)")
plots.save(fig, cfg, "autoencoder_latent_hist")
