"""The committed studies are what `make study` on a fresh clone would call current: every stage's marker
holds the fingerprint of its parameter file (with the overrides the file names for the filter-choice
folders) and the code key of the hdlib modules it runs today. A code change in such a module, or a params
edit, without re-running (or --accept-code, when no number can move) fails here, not on a user's clone."""

from __future__ import annotations

import json

import pytest

from hdlib.config import load_config
from hdlib.tools.runner import discover_stages, stage_fingerprints
from hdlib.tools.stage_inputs import changed_modules, code_key

# folder -> (params file, overrides); the overrides are the ones params/ablations.yaml's header names
COMMITTED = {
    "default": ("params/default.yaml", []),
    "ablations": ("params/ablations.yaml", []),
    "ablations_random": ("params/ablations.yaml", ["filtering.selection=random", "study.name=ablations_random"]),
    "ablations_diverse": ("params/ablations.yaml", ["filtering.selection=diverse", "study.name=ablations_diverse"]),
}


@pytest.mark.parametrize("folder", sorted(COMMITTED))
def test_committed_study_is_current(folder):
    params, overrides = COMMITTED[folder]
    cfg = load_config(params, overrides)
    assert cfg.results_dir.name == folder
    stages = discover_stages()
    prints = stage_fingerprints(cfg, stages)
    stale = []
    for st in stages:
        marker = json.loads((cfg.results_dir / "stages" / f"{st.name}.json").read_text())
        if marker.get("fingerprint") != prints[st.name]:
            stale.append(f"{st.name}: inputs differ from {params} {' '.join(overrides)}")
        code = code_key(st.name)
        if marker.get("code") != code["key"]:
            changed = changed_modules(marker.get("code_modules") or {}, code["modules"])
            stale.append(f"{st.name}: made by other code ({', '.join(changed) or 'unrecorded'})")
    assert not stale, f"results/{folder} is not current: " + "; ".join(stale)
