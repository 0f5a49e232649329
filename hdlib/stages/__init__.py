"""One module per notebook stage; notebook NN_<name>.ipynb calls hdlib.stages.<name>.

    00_data         -> data.py         splits, label fractions, pool, manifests, image caches
    01_autoencoder  -> autoencoder.py  latent scale, latent cache, reconstruction quality
    02_diffusion    -> diffusion.py    loading denoisers, unconditional samples, realism check
    03_guidance     -> guidance.py     noise-aware latent classifier accuracy by t
    04_synthesis    -> synthesis.py    Generation (models loaded once), candidates, filtering
    05_downstream   -> downstream.py   grid cells (content-keyed), one cell's training
    06_quality      -> quality.py      FID / KID / precision / recall of the synthetic sets
    07_report       -> report.py       REPORT.md and the README results block

Shared helpers (notebook setup, metrics JSON) live in common.py. A stage imports
only from stages with a smaller number, never from a later one.
"""
