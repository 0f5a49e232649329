"""Fine-tuning a pre-trained denoiser keeps the objective it was trained with. The study's adaptation used the
study's own diffusion.loss / timestep_sampling (L1, uniform t) on v4, trained with L2 and log-normal noise
levels; measured, it moved the samples away from the target (results/adaptation_length). Now a study that
fine-tunes the model with another objective stops at load time with one line."""

import json
from types import SimpleNamespace

import pytest

from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.models.pretrained import check_objective, training_objective
from hdlib.paths import REPO_ROOT
from hdlib.tools.runner import _check_before_compute

V4 = {"loss": "l2", "snr_gamma": 0.0, "timestep_sampling": "lognormal", "lognormal_mean": -0.5, "lognormal_std": 1.2}


def _folder(tmp_path, denoiser):
    (tmp_path / "card.json").write_text(json.dumps({"denoiser": denoiser}))
    return tmp_path


def test_the_objective_is_read_from_the_card_and_log_normal_settings_count_only_for_log_normal(tmp_path):
    assert training_objective(_folder(tmp_path, {**V4, "lr": 3e-4})) == V4
    uniform = {**V4, "timestep_sampling": "uniform"}
    assert training_objective(_folder(tmp_path, uniform)) == {"loss": "l2", "snr_gamma": 0.0, "timestep_sampling": "uniform"}
    (tmp_path / "card.json").unlink()
    assert training_objective(tmp_path) == {}  # a folder made elsewhere records none: nothing to check


def test_another_objective_is_one_line_naming_the_setting_and_the_value(tmp_path):
    folder = _folder(tmp_path, V4)
    check_objective(folder, SimpleNamespace(**V4))
    with pytest.raises(ConfigError, match=r"^diffusion.loss: 'l1', but .* trained with 'l2' .*set diffusion.loss: l2$"):
        check_objective(folder, SimpleNamespace(**{**V4, "loss": "l1"}))
    with pytest.raises(ConfigError, match="diffusion.lognormal_std"):
        check_objective(folder, SimpleNamespace(**{**V4, "lognormal_std": 1.0}))


def test_the_shipped_card_records_v4s_objective_and_the_studies_that_adapt_it_use_it():
    assert training_objective(REPO_ROOT / "models" / "demo-pool") == V4
    for params in ("default", "ablations"):
        _check_before_compute(load_config(REPO_ROOT / "params" / f"{params}.yaml"))  # no error
    with pytest.raises(ConfigError, match="diffusion.timestep_sampling"):
        _check_before_compute(load_config(REPO_ROOT / "params" / "default.yaml", ["diffusion.timestep_sampling=uniform"]))
    # a study that never fine-tunes the model may train its own denoisers however it likes
    _check_before_compute(load_config(REPO_ROOT / "params" / "default.yaml",
                                      ["diffusion.timestep_sampling=uniform", "diffusion.adaptations=[none]"]))
