"""The memory plan: micro-batches from a budget and a measured step, and a probe that leaves the
model as it found it."""

import pytest
import torch

from hdlib.errors import ConfigError
from hdlib.training.memory_plan import (
    HEADROOM,
    StepMemory,
    budget_gb,
    plan_micro_batch,
    probe_train_step,
)


def test_the_largest_fitting_divisor_is_taken():
    step = StepMemory(fixed_gb=2.0, per_image_gb=1.0)
    # 80 GB x 0.85 = 68 usable, minus 2 fixed: 66 images would fit; the largest divisor of 64 is 64
    assert plan_micro_batch(64, step, 80) == 64
    # 24 GB: 24 x 0.85 - 2 = 18.4 -> at most 18 images; the largest divisor of 64 below is 16
    assert plan_micro_batch(64, step, 24) == 16
    assert plan_micro_batch(48, step, 24) == 16 and plan_micro_batch(7, step, 24) == 7


def test_a_step_that_cannot_fit_is_a_one_line_error():
    with pytest.raises(ConfigError, match="one image needs 30.0 GB but the budget is 24 GB") as err:
        plan_micro_batch(64, StepMemory(fixed_gb=26.0, per_image_gb=4.0), 24, what="autoencoder")
    assert "\n" not in str(err.value) and str(err.value).startswith("autoencoder:")


def test_no_plan_on_the_cpu_without_a_budget():
    assert budget_gb(0, "cpu") is None and budget_gb(40, "cpu") == 40.0


def test_probe_measures_per_image_memory_and_restores_the_model():
    """A fake meter: the 'peak' is 3 GB fixed + 0.5 GB per image of the last step. The probe reads
    0.5 GB per image and 3 GB fixed, and the model's weights, BatchNorm statistics, gradients and
    the random-number state are as before it."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)).train()
    model[0].weight.grad = torch.ones(4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def step_fn(n):
        seen["n"] = n
        x = torch.randn(max(n, 2), 4)
        return model(x).square().mean()

    rng = torch.get_rng_state()
    mem = probe_train_step(model, step_fn, reset_peak=lambda: None,
                           peak_bytes=lambda: int((3 + 0.5 * seen["n"]) * 1024 ** 3))
    assert mem.per_image_gb == pytest.approx(0.5) and mem.fixed_gb == pytest.approx(3.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model[0].weight.grad, torch.ones(4, 4)) and model[0].bias.grad is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert plan_micro_batch(64, mem, 24) == max(d for d in (1, 2, 4, 8, 16, 32, 64) if 3 + 0.5 * d <= 24 * HEADROOM)
