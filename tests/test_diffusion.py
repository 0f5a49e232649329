"""Noise schedules, denoiser loss targets, training noise, and the noise-aware latent classifier."""

import numpy as np
import pytest
import torch

from hdlib.errors import DataError
from hdlib.models.diffusion import (
    diffusion_loss,
    draw_noise_and_timesteps,
    make_noise_scheduler,
    min_snr_weights,
)
from hdlib.models.latent_classifier import (
    NoiseAwareLatentClassifier,
    accuracy_by_timestep_bucket,
    classifier_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------

def test_paper_schedule_is_linear_in_sqrt_beta_with_the_paper_endpoints():
    betas = make_noise_scheduler("paper").betas.double().numpy()
    assert len(betas) == 1000
    np.testing.assert_allclose([betas[0], betas[-1]], [0.0015, 0.0155], rtol=1e-6)
    # sqrt(beta) lies on a straight line (betas are stored in float32: residuals ~1e-8)
    i = np.arange(1000)
    fit = np.polyval(np.polyfit(i, np.sqrt(betas), 1), i)
    assert np.abs(fit - np.sqrt(betas)).max() < 1e-6
    assert not np.allclose(np.diff(betas), np.diff(betas).mean(), rtol=1e-2)  # beta itself is not linear


def test_other_schedules_and_errors():
    lin = make_noise_scheduler("linear", num_train_timesteps=500).betas.double().numpy()
    np.testing.assert_allclose([lin[0], lin[-1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(lin), np.diff(lin).mean(), rtol=1e-4)
    custom = make_noise_scheduler("paper", beta_start=0.001, beta_end=0.02).betas.double().numpy()
    np.testing.assert_allclose([custom[0], custom[-1]], [0.001, 0.02], rtol=1e-6)
    cos = make_noise_scheduler("cosine")
    abar = cos.alphas_cumprod.double().numpy()
    assert np.all(np.diff(abar) < 0) and abar[0] > 0.999 and abar[-1] < 1e-3
    assert make_noise_scheduler("paper").config.clip_sample is False  # latents are not bounded
    with pytest.raises(ValueError, match="'quadratic'"):
        make_noise_scheduler("quadratic")
    with pytest.raises(ValueError, match="'sample'"):
        make_noise_scheduler("paper", prediction_type="sample")


# ---------------------------------------------------------------------------
# diffusion_loss
# ---------------------------------------------------------------------------

class Output:
    def __init__(self, sample):
        self.sample = sample


class OracleUNet(torch.nn.Module):
    """Returns a target computed independently of diffusers from the known z0 and noise,
    and checks that it was given z_t = sqrt(abar) z0 + sqrt(1 - abar) noise."""

    def __init__(self, z0, noise, abar, kind, offset=0.0):
        super().__init__()
        self.z0, self.noise, self.abar, self.kind, self.offset = z0, noise, abar, kind, offset

    def forward(self, z_t, t, class_labels=None):
        a = self.abar[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(z_t, a.sqrt() * self.z0 + (1 - a).sqrt() * self.noise)
        if self.kind == "epsilon":
            out = self.noise
        else:
            out = a.sqrt() * self.noise - (1 - a).sqrt() * self.z0
        return Output(out + self.offset)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_diffusion_loss_targets(kind):
    sched = make_noise_scheduler("paper", prediction_type=kind)
    abar = sched.alphas_cumprod.double()
    z0 = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise, t = draw_noise_and_timesteps(torch.arange(5), (3, 4, 4), 1000)
    abar = abar.float()
    assert diffusion_loss(OracleUNet(z0, noise, abar, kind), z0, noise, t, sched, "l1") < 1e-6
    assert diffusion_loss(OracleUNet(z0, noise, abar, kind), z0, noise, t, sched, "l2") < 1e-10
    off = OracleUNet(z0, noise, abar, kind, offset=0.5)
    assert diffusion_loss(off, z0, noise, t, sched, "l1").item() == pytest.approx(0.5, abs=1e-5)
    assert diffusion_loss(off, z0, noise, t, sched, "l2").item() == pytest.approx(0.25, abs=1e-5)
    other = "v_prediction" if kind == "epsilon" else "epsilon"  # the wrong target is penalised
    assert diffusion_loss(OracleUNet(z0, noise, abar, other), z0, noise, t, sched, "l1") > 0.1
    with pytest.raises(ValueError, match="'huber'"):
        diffusion_loss(OracleUNet(z0, noise, abar, kind), z0, noise, t, sched, "huber")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weighting_downweights_only_low_noise_steps(kind):
    sched = make_noise_scheduler("paper", prediction_type=kind)
    abar = sched.alphas_cumprod.double()
    snr = abar / (1 - abar)
    t = torch.tensor([0, 50, 500, 999])
    w = min_snr_weights(sched, t, gamma=5.0).double()
    expect = snr[t].clamp(max=5.0) / (snr[t] if kind == "epsilon" else snr[t] + 1)
    torch.testing.assert_close(w, expect, rtol=1e-4, atol=0)
    assert w[0] < 0.05  # t=0: SNR ~ 600, so the nearly-clean step is weighted ~gamma/SNR
    if kind == "epsilon":
        assert w[-1] == pytest.approx(1.0)  # high noise (SNR < gamma): unchanged
    # in the loss: the per-sample error is scaled by exactly these weights
    z0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    off = OracleUNet(z0, noise, abar.float(), kind, offset=0.5)
    plain = diffusion_loss(off, z0, noise, t, sched, "l1")
    weighted = diffusion_loss(off, z0, noise, t, sched, "l1", snr_gamma=5.0)
    assert plain.item() == pytest.approx(0.5, abs=1e-5)
    assert weighted.item() == pytest.approx(0.5 * w.mean().item(), rel=1e-4)


def test_diffusion_loss_trains_a_real_unet_with_class_labels(tiny_unet):
    unet = tiny_unet(num_class_embeds=3).train()
    sched = make_noise_scheduler("paper")
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise, t = draw_noise_and_timesteps(torch.arange(4), (4, 8, 8), 1000)
    loss = diffusion_loss(unet, z0, noise, t, sched, class_labels=torch.tensor([0, 1, 2, 2]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert unet.class_embedding.weight.grad.abs().sum() > 0


def test_training_noise_is_per_sample():
    noise, t = draw_noise_and_timesteps(torch.arange(10, 16), (2, 3, 3), 1000)
    n1, t1 = draw_noise_and_timesteps(torch.arange(10, 13), (2, 3, 3), 1000)
    n2, t2 = draw_noise_and_timesteps(torch.arange(13, 16), (2, 3, 3), 1000)
    assert torch.equal(noise, torch.cat([n1, n2])) and torch.equal(t, torch.cat([t1, t2]))
    assert noise.shape == (6, 2, 3, 3) and t.dtype == torch.long and 0 <= t.min() and t.max() < 1000
    assert not torch.equal(noise[0], noise[1])
    many_t = draw_noise_and_timesteps(torch.arange(400), (1, 1, 1), 50)[1]
    assert set(many_t.tolist()) == set(range(50))  # covers the whole range


# ---------------------------------------------------------------------------
# latent classifier
# ---------------------------------------------------------------------------

def toy_latents(n, seed=0):
    """Two classes that differ in the mean of channel 0 (+1 / -1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    z0 = 0.5 * torch.randn(n, 4, 8, 8, generator=g)
    z0[:, 0] += (1 - 2 * labels.float()).view(-1, 1, 1)
    return z0, labels


def test_classifier_shape_and_timestep_conditioning(tiny_classifier):
    clf = tiny_classifier(num_classes=9, seed=0)
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        a = clf(z, torch.tensor([0, 0, 0]))
        b = clf(z, torch.tensor([900, 900, 900]))
        c = clf(z, 0)  # one int for the batch
    assert a.shape == (3, 9)
    assert torch.equal(a, c)
    assert (a - b).abs().max() > 1e-4  # t changes the output
    with pytest.raises(ValueError, match="attention_resolutions \\[16\\]"):
        NoiseAwareLatentClassifier(4, 9, 8, width=16, depth=1, channel_mult=(1, 2), attention_resolutions=(16,),
                                   norm_num_groups=8)
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        NoiseAwareLatentClassifier(4, 9, 8, width=16, depth=1, channel_mult=(1, 2))


def test_classifier_loss_decreases_and_accuracy_by_bucket(tiny_classifier):
    sched = make_noise_scheduler("paper")
    clf = tiny_classifier(num_classes=2, seed=0).train()
    z0, labels = toy_latents(32)
    noise, t = draw_noise_and_timesteps(torch.arange(32), (4, 8, 8), 1000)
    t = t // 3  # mostly low/mid noise, where the classes are separable
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, logits = classifier_loss(clf, z0, labels, noise, t, sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert logits.shape == (32, 2)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    zt, yt = toy_latents(64, seed=1)
    df = accuracy_by_timestep_bucket(clf, zt, yt, sched, buckets=4, seed=0, batch_size=16)
    assert list(df.columns) == ["bucket_start", "bucket_end", "accuracy", "n"]
    assert list(df["bucket_start"]) == [0, 250, 500, 750] and list(df["bucket_end"]) == [250, 500, 750, 1000]
    assert (df["n"] == 64).all() and df["accuracy"].between(0, 1).all()
    assert df["accuracy"].iloc[0] > 0.9  # held-out toy latents at low noise are classified
    assert clf.training  # mode restored
    again = accuracy_by_timestep_bucket(clf, zt, yt, sched, buckets=4, seed=0, batch_size=64)
    # Noise and timesteps do not depend on the batch size; the logits do, by float rounding
    # (CPU kernels are not batch-invariant), which may flip at most a near-tie prediction.
    assert again.drop(columns="accuracy").equals(df.drop(columns="accuracy"))
    assert (again["accuracy"] - df["accuracy"]).abs().max() <= 1 / 64
    with pytest.raises(DataError, match="class id 7"):
        accuracy_by_timestep_bucket(clf, zt[:2], torch.tensor([0, 7]), sched)
    with pytest.raises(DataError, match="class id 2"):
        classifier_loss(clf, z0[:2], torch.tensor([2, 0]), noise[:2], t[:2], sched)


def test_pretrained_encoder_classifier_trains_only_its_head_and_guides(tiny_unet):
    """backbone=pretrained_unet: the denoiser's encoder stays frozen (its weights do not move,
    it has no optimizer state), the head learns the toy classes, and the logits have a
    gradient with respect to z_t (what guidance needs)."""
    from hdlib.config import LatentClassifierConfig
    from hdlib.models.builders import build_latent_classifier

    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    lc = LatentClassifierConfig(backbone="pretrained_unet", head_width=32)
    clf = build_latent_classifier(lc, 4, 8, 2, encoder_unet=unet).train()
    assert not any(p.requires_grad for p in clf.encoder.parameters()) and not clf.encoder.training
    assert "up_blocks" not in "".join(n for n, _ in clf.named_parameters())  # decoder half not kept
    sched = make_noise_scheduler("paper")
    z0, labels = toy_latents(32)
    noise, t = draw_noise_and_timesteps(torch.arange(32), (4, 8, 8), 1000)
    t = t // 3
    opt = torch.optim.Adam([p for p in clf.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = classifier_loss(clf, z0, labels, noise, t, sched)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    clf.eval()(z, torch.tensor([100, 100])).log_softmax(-1)[:, 0].sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the pre-trained denoiser"):
        build_latent_classifier(lc, 4, 8, 2)
    with pytest.raises(ValueError, match="differ"):
        build_latent_classifier(lc, 4, 16, 2, encoder_unet=unet)
