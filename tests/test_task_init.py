"""A trained model's initial weights come from its task's seed alone: an evaluation run before it in the same
process (its DataLoader draws from the global RNG) must not change them. Found when adding the shifted test
cohort's evaluations moved stage 03's first latent classifier."""

import torch

from hdlib.config import load_config
from hdlib.study import train


class _Pool(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(3, 16, 16, dtype=torch.uint8), 0


def test_initial_weights_do_not_depend_on_earlier_draws_from_the_global_rng(monkeypatch):
    monkeypatch.setattr(train, "split_images", lambda cfg, split, rows=None: _Pool())
    monkeypatch.setattr(train, "task_key", lambda *a: "")  # it reads manifests; the weights are what is checked
    cfg = load_config("params/smoke.yaml")
    torch.manual_seed(123)
    first = train.build_task(cfg, "autoencoder").model.state_dict()
    torch.rand(1000)  # e.g. a DataLoader's base seed, drawn by an evaluation that ran in between
    state = torch.random.get_rng_state()
    second = train.build_task(cfg, "autoencoder").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left as it was
