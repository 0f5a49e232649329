"""Work in several processes: the resumable grid of cells, the multi-process launcher, and the progress
side channel a stage's kernel reports through."""
