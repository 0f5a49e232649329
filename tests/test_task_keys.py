"""Which settings and inputs key which study task (hdlib.study.task_keys): a change reaches exactly the models
whose weights it decides. Files and weights are stubbed: the key's inputs are what is checked here; the
smoke study checks a real retraining."""

import pytest

from hdlib.config import load_config
from hdlib.paths import REPO_ROOT
from hdlib.study import task_keys


@pytest.fixture
def stubbed(monkeypatch):
    inputs = {"pool": "p", "target_train": "t", "autoencoder": "ae", "denoiser_pretrained": "unet"}
    monkeypatch.setattr(task_keys, "manifest_hash", lambda cfg, split, fraction=None, draw=None:
                        f"{inputs[split]}:{fraction}:{draw}")
    monkeypatch.setattr(task_keys, "weights_key", lambda cfg, name: inputs[name])
    monkeypatch.setattr(task_keys, "noise_scheduler", lambda cfg: type("S", (), {"config": {"beta_end": 0.0155}})())
    monkeypatch.setattr(task_keys, "files_sha1", lambda paths: "baseline")
    return inputs


def _keys(overrides=()):
    cfg = load_config(REPO_ROOT / "params" / "default.yaml", list(overrides))
    return {"adapted": task_keys.task_key(cfg, "denoiser_adapted", None, "target_unlabeled", None, False),
            "adapted_labeled": task_keys.task_key(cfg, "denoiser_adapted", 0.025, "labeled", 0, True),
            "latent_classifier": task_keys.task_key(cfg, "latent_classifier", 0.025, None, 0, True),
            "latent_classifier_1": task_keys.task_key(cfg, "latent_classifier", 0.025, None, 1, True),
            "scratch": task_keys.task_key(cfg, "denoiser_scratch", 0.025, None, 0, True)}


def test_a_setting_changes_the_keys_of_the_models_it_decides_and_no_other(stubbed):
    base = _keys()
    assert len(set(base.values())) == len(base)  # every model its own key
    assert base == _keys()  # a key is a function of its inputs
    changed = {ov: {k for k, v in _keys([ov]).items() if v != base[k]} for ov in (
        "diffusion.loss=l1", "diffusion.timestep_sampling=uniform", "latent_classifier.pseudo_label_threshold=0.8",
        "diffusion.preview_samples=3", "sampling.guidance_scale=9")}
    assert changed["diffusion.loss=l1"] == changed["diffusion.timestep_sampling=uniform"] == {
        "adapted", "adapted_labeled", "scratch"}
    assert changed["latent_classifier.pseudo_label_threshold=0.8"] == {"latent_classifier", "latent_classifier_1"}
    assert changed["diffusion.preview_samples=3"] == changed["sampling.guidance_scale=9"] == set()


def test_new_starting_weights_or_images_change_the_keys_that_read_them(stubbed):
    base = _keys()
    stubbed["denoiser_pretrained"] = "another unet"  # the adaptation starts from it, the classifier's backbone is it
    assert {k for k, v in _keys().items() if v != base[k]} == {"adapted", "adapted_labeled", "latent_classifier",
                                                              "latent_classifier_1"}
    stubbed["denoiser_pretrained"], stubbed["target_train"] = "unet", "other target images"
    assert all(v != base[k] for k, v in _keys().items())


def test_the_schedule_part_of_a_key_is_the_same_in_every_process():
    """diffusers' `_use_default_values` comes from a set, so its order follows the process's string hash
    seed: a key that held it changed from one run to the next and retrained every model each time."""
    import os
    import subprocess
    import sys

    code = ("import json; from hdlib.config import load_config; from hdlib.study.task_keys import schedule_settings; "
            "print(json.dumps(schedule_settings(load_config('params/smoke.yaml')), sort_keys=True, default=str))")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1 and "beta_start" in outs.pop()
