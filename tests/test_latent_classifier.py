"""Latent-classifier model selection on the timesteps the configured sampler visits
(restricted to the guidance interval), each weighted equally."""

import pytest
import torch
from test_sampling import TimestepSpy

from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.models.diffusion import make_noise_scheduler
from hdlib.sampling.samplers import (
    guided_ddim_sample,
    guided_ddpm_sample,
    guided_dpm_solver_sample,
)
from hdlib.study.train import (
    LATENT_CLASSIFIER_EVAL_T,
    latent_classifier_scores,
    latent_classifier_selection_timesteps,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (4, 8, 8)
SAMPLERS = {"ddim": guided_ddim_sample, "ddpm": guided_ddpm_sample, "dpm_solver": guided_dpm_solver_sample}


Spy = TimestepSpy  # records the timestep of every call (tests/test_sampling.py)


@pytest.mark.parametrize("method,steps,interval", [
    ("ddim", 25, []), ("dpm_solver", 10, []), ("ddim", 8, [300, 800]), ("dpm_solver", 10, [0, 550]),
    ("ddpm", 6, []),
])
def test_selection_timesteps_are_the_timesteps_the_sampler_visits(method, steps, interval, tiny_unet,
                                                                  tiny_classifier):
    """The classifier is selected exactly on the t at which the configured sampler calls it:
    every visited t without an interval, the visited t inside it with one."""
    cfg = load_config(None, [f"sampling.method={method}", f"sampling.num_inference_steps={steps}",
                             f"sampling.guidance_interval={interval}"])
    sched = make_noise_scheduler("paper")
    unet, clf = Spy(tiny_unet()), Spy(tiny_classifier())
    extra = {"eta": 1.0} if method == "ddim" else {}
    SAMPLERS[method](unet, sched, torch.tensor([0]), torch.tensor([3]), classifier=clf, guidance_scale=2.0,
                     num_inference_steps=steps, latent_shape=SHAPE, progress=False,
                     guidance_interval=tuple(interval) or None, **extra)
    selected = latent_classifier_selection_timesteps(cfg, sched)
    assert selected == clf.seen
    assert len(unet.seen) == steps and selected == [t for t in unet.seen if not interval
                                                    or interval[0] <= t <= interval[1]]
    if method == "dpm_solver" and not interval:
        assert selected == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]  # the class is decided up there


def test_an_interval_that_holds_no_visited_timestep_is_a_config_error():
    cfg = load_config(None, ["sampling.method=dpm_solver", "sampling.num_inference_steps=10",
                             "sampling.guidance_interval=[901, 998]"])
    with pytest.raises(ConfigError, match="sampling.guidance_interval.*never be applied") as e:
        latent_classifier_selection_timesteps(cfg, make_noise_scheduler("paper"))
    assert "\n" not in str(e.value)


class DecidesAbove(torch.nn.Module):
    """Classifies z_t correctly (by the sign of channel 0's mean) only at t >= 500, or only
    below it (`above=False`); otherwise it always says class 1."""

    num_classes = 2

    def __init__(self, above: bool):
        super().__init__()
        self.above = above
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, z, t):
        m = z[:, 0].mean(dim=(1, 2))
        right = torch.stack([m, -m], 1)
        wrong = torch.tensor([-1.0, 1.0]).expand(len(z), 2)
        use = (t >= 500) if self.above else (t < 500)
        return self.w * torch.where(use[:, None], right, wrong)


def test_selection_score_weights_the_sampler_timesteps_equally_and_keeps_the_grid_columns():
    sched = make_noise_scheduler("paper")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=g)
    z0 = torch.randn(64, *SHAPE, generator=g) * 0.1
    z0[:, 0] += torch.where(labels == 0, 3.0, -3.0)[:, None, None]  # a strong class signal
    sel_t = [999, 899, 700, 500, 400, 25]
    plain = latent_classifier_scores(DecidesAbove(True), z0, labels, sched)
    scores = latent_classifier_scores(DecidesAbove(True), z0, labels, sched, selection_timesteps=sel_t)
    assert {k: scores[k] for k in plain} == plain  # the fixed grid's columns do not change
    assert "val_acc_selection" not in plain
    per_t = [scores[f"val_acc_sel_t{t}"] for t in sel_t]
    assert scores["selection_timesteps"] == len(sel_t)
    assert scores["val_acc_selection"] == pytest.approx(sum(per_t) / len(per_t))
    for t in set(sel_t) & set(LATENT_CLASSIFIER_EVAL_T):  # a grid t: the same noise, the same score
        assert scores[f"val_acc_sel_t{t}"] == scores[f"val_acc_t{t}"]
    # the classifier that is right where DPM-Solver's high-t steps guide wins on the selection
    # score and loses on the old t < 500 criterion
    cfg = load_config(None, ["sampling.method=dpm_solver", "sampling.num_inference_steps=10",
                             "sampling.guidance_interval=[500, 999]"])
    visited = latent_classifier_selection_timesteps(cfg, sched)
    high = latent_classifier_scores(DecidesAbove(True), z0, labels, sched, selection_timesteps=visited)
    low = latent_classifier_scores(DecidesAbove(False), z0, labels, sched, selection_timesteps=visited)
    assert high["val_acc_selection"] > low["val_acc_selection"] + 0.25
    assert high["val_acc_t_lt_500"] < low["val_acc_t_lt_500"]
