"""Each stage declares what it reads beside its code (hdlib/stages/<name>.py: READS); the fingerprint
comes from that declaration, and the code key from the hdlib modules the stage runs."""

import ast

import pytest

from hdlib.config import load_config
from hdlib.tools.runner import discover_stages, stage_fingerprints
from hdlib.tools.stage_inputs import (
    _without_docstrings,
    code_closure,
    config_values,
    declared_reads,
    undeclared,
)

STAGES = discover_stages()
SMOKE = "params/smoke.yaml"


def _prints(*overrides):
    return stage_fingerprints(load_config(SMOKE, list(overrides)), STAGES)


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_every_stage_declares_keys_that_exist(stage):
    reads = declared_reads(stage)
    config_values(load_config(SMOKE), reads["config"])  # a KeyError on a key the config does not have
    assert all(isinstance(f, str) for f in reads["files"])


def test_adding_a_seed_reruns_from_stage_00():
    """Stage 00 draws the label subsets of every downstream seed: a new seed is a new stage 00 (and so
    everything after it); before, stage 00 was keyed on study.seed and data only."""
    base, more = _prints(), _prints("downstream.seeds=[0, 1, 2]")
    assert base["00_data"] != more["00_data"]


def test_adding_a_training_set_reruns_the_stages_that_train_or_read_it():
    """Stage 02 trains a from-scratch denoiser per downstream.training_sets: adding `scratch` re-runs 02
    onward (before, stage 02 was not keyed on it), never 00 or 01."""
    cfg = load_config(SMOKE)
    sets = [s for s in cfg.downstream.training_sets if s != "scratch"]
    base = _prints(f"downstream.training_sets=[{', '.join(sets)}]")
    more = _prints(f"downstream.training_sets=[{', '.join(sets + ['scratch'])}]")
    changed = [s for s in base if base[s] != more[s]]
    assert changed[0] == "02_diffusion" and "00_data" not in changed and "01_autoencoder" not in changed


def test_a_key_no_stage_reads_changes_no_fingerprint():
    assert _prints() == _prints("pretrain.eval_samples=17")


def test_code_closure_follows_imports():
    closure = code_closure("05_downstream")
    assert "hdlib.stages.downstream" in closure and "hdlib.training.trainer" in closure and "hdlib.study.grid_cells" in closure
    assert "hdlib.pretrain.card" not in closure  # a tool the stage never runs


def test_docstrings_and_comments_are_not_code_changes():
    a = ast.parse('def f(x):\n    """Doc."""\n    return x + 1  # why\n')
    b = ast.parse('def f(x):\n    """Another doc."""\n    # a comment\n    return x + 1\n')
    c = ast.parse('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert _without_docstrings(a) == _without_docstrings(b) != _without_docstrings(c)


def test_undeclared_names_reads_outside_the_declaration():
    assert undeclared({"data.image_size", "downstream.seeds", "sampling.eta"}, ["data", "downstream.seeds"]) == \
        ["sampling.eta"]


def test_the_recorder_logs_first_reads_of_keys_not_loading_or_copies(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "reads.txt"
    code = ("from hdlib.config import load_config\n"
            "c = load_config('params/smoke.yaml')\n"
            "c.downstream.seeds; c.downstream.seeds; c.data.image_size; c.to_dict(); c.section_hash('sampling')\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ,
                                                                  "HDLIB_RECORD_CONFIG_READS": str(log)})
    assert log.read_text().splitlines() == ["downstream.seeds", "data.image_size"]
