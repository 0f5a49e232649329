"""Data layer, one concept per module: `records` (image records and the loaders of the
real formats), `hashing` (content hashes), `pixels` (decoding), `tiling` (large images
into tiles), `pool` (the unlabeled pre-training pool), `splits`, `manifests`,
`streaming` (torch datasets decoded on the fly) and `latents` (the latent cache)."""
