"""Stage 00: build or scan the data, hold out validation, draw nested label
fractions and the unlabeled pool, write manifests and decoded-image caches."""

from __future__ import annotations





