"""Model builders and weights in and out: the autoencoder, the latent denoisers and the latent
classifier (builders), noise schedules and the denoiser loss (diffusion), diffusers save/load (pretrained)."""
