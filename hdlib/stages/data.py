"""Stage 00: build or scan the data, hold out validation, draw nested label
fractions and the unlabeled pool, write manifests and decoded-image caches."""

from __future__ import annotations

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "data", "downstream.seeds"],
    "files": [],
}
