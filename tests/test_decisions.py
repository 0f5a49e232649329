"""Decisions are data: one writer (the stage that makes it), one reader (hdlib.study.decisions), and a
missing decision is an error naming its stage, never the params file's value."""

import pytest

from hdlib.config import load_config
from hdlib.errors import HDLibError
from hdlib.study import decisions


def _cfg(tmp_path):
    return load_config("params/smoke.yaml", [f"study.results_root={tmp_path}"])


def test_a_missing_decision_names_the_stage_that_records_it(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(HDLibError, match=r"guidance.json: missing; stage 04_synthesis records this decision") as err:
        decisions.guidance(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(HDLibError, match="stage 03_guidance records"):
        decisions.primary_fraction(cfg)


def test_recorded_decisions_are_read_back_typed(tmp_path):
    cfg = _cfg(tmp_path)
    decisions.record(cfg, "primary_cell", {"fraction": 0.25, "labels_per_class": {"total": 4}})
    decisions.record(cfg, "guidance", {"guidance_scale": 5, "guidance_interval": [300, 999], "adaptation": "none",
                                       "sampler": {"method": "dpm_solver", "num_inference_steps": 10},
                                       "chosen_on": "validation", "selection": None})
    assert decisions.primary_fraction(cfg) == 0.25
    g = decisions.guidance(cfg)
    assert (g.scale, g.interval, g.adaptation, g.method, g.steps) == (5.0, [300, 999], "none", "dpm_solver", 10)
    with pytest.raises(HDLibError, match="unknown decision"):
        decisions.record(cfg, "lambda", {})
