"""Guidance interval plumbing: the config keys and their checks, Generation (a stage's
choice, part of `gen.sampling`, handed to the sampler) and the validation choice of stage 04."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.models.diffusion import make_noise_scheduler
from hdlib.paths import model_name
from hdlib.sampling.samplers import guided_ddim_sample
from hdlib.study.context import write_metrics

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_defaults_guide_every_step():
    cfg = load_config(None)
    assert cfg.sampling.guidance_interval == [] and cfg.sampling.guidance_interval_sweep == []
    for name in ("default", "smoke", "nct_crc"):  # the shipped params load with theirs
        load_config(ROOT / "params" / f"{name}.yaml")
    cfg = load_config(None, ["sampling.guidance_interval=[0, 999]",
                             "sampling.guidance_interval_sweep=[[], [200, 800], [500, 500]]"])
    assert cfg.sampling.guidance_interval == [0, 999]
    assert cfg.sampling.guidance_interval_sweep == [[], [200, 800], [500, 500]]


@pytest.mark.parametrize("override,key", [
    ("sampling.guidance_interval=[800, 200]", "sampling.guidance_interval"),
    ("sampling.guidance_interval=[0, 1000]", "sampling.guidance_interval"),
    ("sampling.guidance_interval=[100]", "sampling.guidance_interval"),
    ("sampling.guidance_interval=[1, 2, 3]", "sampling.guidance_interval"),
    ("sampling.guidance_interval=[-1, 10]", "sampling.guidance_interval"),
    ("sampling.guidance_interval=[0.5, 10]", "sampling.guidance_interval"),
    ("sampling.guidance_interval_sweep=[[0, 500], [600, 100]]", "sampling.guidance_interval_sweep[1]"),
    ("sampling.guidance_interval_sweep=[[0, 500, 900]]", "sampling.guidance_interval_sweep[0]"),
    ("sampling.guidance_interval_sweep=[0, 500]", "sampling.guidance_interval_sweep"),
])
def test_bad_intervals_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "params" / "smoke.yaml", [override])
    assert key in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

def _study(tmp_path, *overrides):
    cfg = load_config(None, [f"study.results_root={tmp_path}", "study.device=cpu", "study.progress=false",
                             "sampling.method=ddim", "sampling.num_inference_steps=6", "sampling.batch_size=4",
                             *overrides])
    write_metrics(cfg, "01_autoencoder", {"latent_shape": [4, 8, 8], "scale_factor": 1.0})
    return cfg


def test_generation_takes_the_interval_like_the_scale_and_hands_it_to_the_sampler(tmp_path, tiny_unet,
                                                                                   tiny_classifier):
    from hdlib.study.generation import Generation

    cfg = _study(tmp_path, "sampling.guidance_interval=[500, 999]")
    assert Generation(cfg).sampling.guidance_interval == [500, 999]  # default: the config's
    gen = Generation(cfg, guidance_scale=20.0, guidance_interval=[0, 400])
    assert gen.sampling.guidance_interval == [0, 400] and vars(gen.sampling)["guidance_interval"] == [0, 400]
    assert cfg.sampling.guidance_interval == [500, 999]  # the config is never written
    assert Generation(cfg, guidance_interval=[]).guidance_interval() is None  # [] = every step
    with pytest.raises(ConfigError, match="guidance_interval"):
        Generation(cfg, guidance_interval=[400, 0])

    unet, clf, sched = tiny_unet(), tiny_classifier(), make_noise_scheduler("paper")
    labels, seeds = torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9])

    def latents(g):
        g._models.update({"denoiser_pretrained": unet, model_name("latent_classifier", 0.05, draw=0): clf})
        return g.latents("histodiffusion", 0.05, labels, seeds, draw=0, progress=False)

    kw = dict(classifier=clf, guidance_scale=20.0, num_inference_steps=6, eta=cfg.sampling.eta, latent_shape=(4, 8, 8),
              batch_size=4, progress=False)
    direct = guided_ddim_sample(unet, sched, labels, seeds, guidance_interval=(0, 400), **kw)
    assert torch.equal(latents(gen), direct)
    assert not torch.equal(direct, guided_ddim_sample(unet, sched, labels, seeds, **kw))
    assert torch.equal(latents(Generation(cfg, guidance_scale=20.0, guidance_interval=[])),
                       guided_ddim_sample(unet, sched, labels, seeds, **kw))


# ---------------------------------------------------------------------------
# choosing the interval on validation (stage 04), with the sampling stubbed out
# ---------------------------------------------------------------------------

class FakeGeneration:
    made = []

    def __init__(self, cfg, adaptation=None, guidance_scale=None, sampler=None, guidance_interval=None):
        self.adaptation = adaptation
        self.interval = list(cfg.sampling.guidance_interval if guidance_interval is None else guidance_interval)
        FakeGeneration.made.append((adaptation, self.interval))


def _choose(monkeypatch, cfg, agreement, look=lambda adaptation, scale, interval: 1.0):
    """choose_guidance with synthesize / scoring stubbed: `agreement(adaptation, scale, interval)`,
    `look(...)` the Frechet distance to the target's unlabeled images."""
    from hdlib.stages import synthesis

    calls = []

    def fake_synthesize(gen, generator, fraction, draw, quota, guidance_scale=None, tag=""):
        calls.append({"tag": tag, "interval": gen.interval, "scale": guidance_scale})
        return pd.DataFrame({"key": [(gen.adaptation, guidance_scale, tuple(gen.interval))]})

    FakeGeneration.made = []
    monkeypatch.setattr(synthesis, "Generation", FakeGeneration)
    monkeypatch.setattr(synthesis, "synthesize", fake_synthesize)
    monkeypatch.setattr(synthesis, "_in_memory", lambda cfg, df: (df["key"][0], None))
    monkeypatch.setattr(synthesis, "validation_agreement", lambda judge, key, labels: agreement(*key))
    monkeypatch.setattr(synthesis, "target_features", lambda cfg, judge, fraction, draw: None)
    monkeypatch.setattr(synthesis, "frechet_to_target", lambda judge, key, target: look(*key))
    choice, table = synthesis.choose_guidance(cfg, 0.05, 0, judge=None)
    return choice, table, calls


def test_without_an_interval_sweep_the_choice_loops_as_before(monkeypatch):
    cfg = load_config(None, ["diffusion.adaptations=[none, target_unlabeled]", "sampling.guidance_sweep=[0.0, 5.0, 10.0]"])
    choice, table, calls = _choose(monkeypatch, cfg, lambda a, s, iv: {0.0: 0.3, 5.0: 0.6, 10.0: 0.7}[s]
                                   + (0.05 if a == "target_unlabeled" else 0),
                                   look=lambda a, s, iv: 0.5 if a == "target_unlabeled" else 1.0)
    assert [c["tag"] for c in calls] == [f"select_{a}_s{s:g}" for a in ("none", "target_unlabeled")
                                         for s in (0.0, 5.0, 10.0)]  # the sets of before: reused
    assert FakeGeneration.made == [("none", []), ("target_unlabeled", [])]
    assert table["guidance_interval"].tolist() == [[]] * 6
    assert {k: choice[k] for k in ("adaptation", "guidance_scale", "guidance_interval", "validation_agreement")} == {
        "adaptation": "target_unlabeled", "guidance_scale": 10.0, "guidance_interval": [],
        "validation_agreement": pytest.approx(0.75)}
    assert choice["frechet_to_target"] == 0.5 and "Frechet" in choice["rule"]


def test_the_interval_sweep_is_chosen_with_the_scale(monkeypatch):
    cfg = load_config(None, ["diffusion.adaptations=[none]", "sampling.guidance_sweep=[0.0, 5.0, 10.0]",
                             "sampling.guidance_interval_sweep=[[], [500, 999], [0, 499]]"])
    best = {(): 0.5, (500, 999): 0.8, (0, 499): 0.4}
    choice, table, calls = _choose(monkeypatch, cfg, lambda a, s, iv: 0.2 if s == 0 else best[iv] + s / 1000)
    assert choice["guidance_interval"] == [500, 999] and choice["guidance_scale"] == 5.0  # 10: within 0.02
    # unguided once (the interval changes nothing without guidance); every guided (scale, interval) once
    assert [(c["scale"], c["interval"]) for c in calls] == [
        (0.0, []), (5.0, []), (10.0, []), (5.0, [500, 999]), (10.0, [500, 999]), (5.0, [0, 499]), (10.0, [0, 499])]
    assert len({c["tag"] for c in calls}) == len(calls)  # each its own synthetic set
    assert table["guidance_interval"].tolist() == [c["interval"] for c in calls]
    # ties within 0.02: the smaller scale, then the configured interval ([] here), then the sweep's order
    choice, _, _ = _choose(monkeypatch, cfg, lambda a, s, iv: 0.2 if s == 0 else 0.8 - (iv == (0, 499)) * 0.01)
    assert (choice["guidance_scale"], choice["guidance_interval"]) == (5.0, [])
    cfg2 = load_config(None, ["diffusion.adaptations=[none]", "sampling.guidance_sweep=[0.0, 5.0]",
                              "sampling.guidance_interval=[0, 499]",
                              "sampling.guidance_interval_sweep=[[500, 999], [0, 499]]"])
    choice, _, _ = _choose(monkeypatch, cfg2, lambda a, s, iv: 0.2 if s == 0 else 0.8)
    assert choice["guidance_interval"] == [0, 499]


def test_the_target_look_decides_among_settings_with_near_best_agreement(monkeypatch):
    """Class agreement first; within the margin, the samples closest to the unlabeled target images."""
    cfg = load_config(None, ["diffusion.adaptations=[none, target_unlabeled]", "sampling.guidance_sweep=[0.0, 10.0]"])
    choice, table, _ = _choose(monkeypatch, cfg,
                               lambda a, s, iv: {0.0: 0.2, 10.0: 0.80}[s] + (0.0 if a == "target_unlabeled" else 0.03),
                               look=lambda a, s, iv: 10.0 if a == "none" else 4.0)
    assert choice["adaptation"] == "target_unlabeled"  # 0.80 is within 0.05 of 0.83 and looks like the target
    far, _, _ = _choose(monkeypatch, cfg,
                        lambda a, s, iv: {0.0: 0.2, 10.0: 0.70}[s] + (0.0 if a == "target_unlabeled" else 0.10),
                        look=lambda a, s, iv: 10.0 if a == "none" else 4.0)
    assert far["adaptation"] == "none"  # 0.70 vs 0.80: agreement outside the margin is not traded for look
