"""`make gpu-check`: every GPU code path on one GPU in a few minutes (skipped cleanly without CUDA).

The Trainer in bf16 and fp16 with EMA, resume and the memory plan; every sampler with guidance and
the guidance interval, and classifier-free guidance, against the CPU; the smoke study end to end on
`cuda`; a 2-process NCCL run of training and sampling when two GPUs are there; one paper-size training
step of each network with its peak memory (printed: `make gpu-check` shows it)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from hdlib.config import load_config
from hdlib.models.builders import (
    autoencoder_loss,
    build_autoencoder,
    build_latent_classifier,
    build_unet,
)
from hdlib.models.diffusion import (
    diffusion_loss,
    draw_noise_and_timesteps,
    make_noise_scheduler,
)
from hdlib.sampling import samplers as sampling
from hdlib.training.batching import TensorBatchSource
from hdlib.training.settings import TrainConfig
from hdlib.training.trainer import Trainer
from hdlib.training.weights import load_final

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parent.parent
SMOKE = load_config(ROOT / "params/smoke.yaml")
SCHED = make_noise_scheduler("paper")


def _latents(n=32):
    g = torch.Generator().manual_seed(0)
    return TensorBatchSource(torch.randn(n, 4, 8, 8, generator=g))


def _denoise_loss(model, batch, seeds):
    z0 = batch[0]
    noise, t = draw_noise_and_timesteps(seeds, (4, 8, 8), 1000)
    return diffusion_loss(model, z0, noise.to(z0.device), t.to(z0.device), SCHED)


def _train(out, precision, max_steps, **kw):
    tc = TrainConfig(out_dir=str(out), max_steps=max_steps, global_batch_size=8, lr=1e-3, ema_decay=0.9,
                     mixed_precision=precision, checkpointing_steps=2, progress=False, device="cuda", **kw)
    torch.manual_seed(0)  # both runs start from the same weights (unseeded, they did not: the first H200 run)
    trainer = Trainer(build_unet(SMOKE.diffusion, 4, 8), _denoise_loss, _latents(), tc)
    return trainer, trainer.train()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_on_cuda_with_ema_and_resume(tmp_path, precision):
    """A run stopped at step 4 and resumed to 6 ends where an uninterrupted run to 6 ends (deterministic
    kernels are on); the EMA weights differ from the raw ones; the memory plan wrote its figures."""
    trainer, res = _train(tmp_path / "a", precision, 4)
    assert trainer.accelerator.device.type == "cuda" and res.step == 4
    _, resumed = _train(tmp_path / "a", precision, 6)
    _, whole = _train(tmp_path / "b", precision, 6)
    assert resumed.resumed_from_step == 4 and whole.resumed_from_step == 0
    a = load_final(build_unet(SMOKE.diffusion, 4, 8), tmp_path / "a", ema=True).state_dict()
    b = load_final(build_unet(SMOKE.diffusion, 4, 8), tmp_path / "b", ema=True).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    raw = load_final(build_unet(SMOKE.diffusion, 4, 8), tmp_path / "a", ema=False).state_dict()
    assert any(not torch.equal(a[k], raw[k]) for k in a)
    plan = json.loads((tmp_path / "a" / "memory_plan.json").read_text())
    assert plan["micro_batch_size"] in (1, 2, 4, 8) and plan["per_image_gb"] >= 0


def _sampling_models(device):
    torch.manual_seed(0)
    unet = build_unet(SMOKE.diffusion, 4, 8).eval().to(device)
    clf = build_latent_classifier(SMOKE.latent_classifier, 4, 8, 9,
                                  encoder_unet=build_unet(SMOKE.diffusion, 4, 8)).eval().to(device)
    return unet, clf


@pytest.mark.parametrize("method", ["guided_ddim_sample", "guided_ddpm_sample", "guided_dpm_solver_sample"])
@pytest.mark.parametrize("interval", [None, (300, 999)])
def test_guided_samplers_on_gpu_match_the_cpu(method, interval):
    kw = dict(guidance_scale=3.0, num_inference_steps=4, latent_shape=(4, 8, 8), progress=False,
              guidance_interval=interval)
    labels, seeds = torch.tensor([0, 3, 5]), torch.tensor([11, 12, 13])
    cpu = getattr(sampling, method)(*_sampling_models("cpu")[:1], SCHED, labels, seeds,
                                    classifier=_sampling_models("cpu")[1], device="cpu", **kw)
    unet, clf = _sampling_models("cuda")  # both on the GPU (the old test left the classifier on the CPU)
    gpu = getattr(sampling, method)(unet, SCHED, labels, seeds, classifier=clf, device="cuda", **kw)
    assert torch.allclose(cpu, gpu, atol=2e-3, rtol=2e-3)


def test_classifier_free_guidance_on_gpu_matches_the_cpu():
    def run(device):
        torch.manual_seed(0)
        unet = build_unet(SMOKE.diffusion, 4, 8, num_classes=9).eval().to(device)
        return sampling.cfg_ddim_sample(unet, SCHED, torch.tensor([1, 2]), torch.tensor([5, 6]), null_label=9,
                                        cfg_scale=2.0, num_inference_steps=4, latent_shape=(4, 8, 8),
                                        device=device, progress=False)
    assert torch.allclose(run("cpu"), run("cuda"), atol=2e-3, rtol=2e-3)


def test_smoke_study_end_to_end_on_cuda(tmp_path):
    from hdlib.tools.runner import run_study

    status = run_study(ROOT / "params/smoke.yaml", [f"study.results_root={tmp_path}", "study.device=cuda"],
                       log=lambda *a: None)
    assert set(status.values()) == {"ran"}
    metrics = tmp_path / "smoke" / "metrics"
    assert (metrics / "05_downstream.json").exists() and (tmp_path / "smoke" / "REPORT.md").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_process_nccl_training_matches_one_process(tmp_path):
    from hdlib.parallel.launch import launch

    toy = ROOT / "tests" / "_train_toy.py"
    launch([str(toy), "--out", str(tmp_path / "two"), "--max-steps", "8", "--ckpt-every", "100"], 2,
           backend="nccl", env={"PYTHONPATH": str(ROOT)})
    launch([str(toy), "--out", str(tmp_path / "one"), "--max-steps", "8", "--ckpt-every", "100"], 1,
           backend="nccl", env={"PYTHONPATH": str(ROOT)})
    sys.path.insert(0, str(ROOT / "tests"))
    from _train_toy import toy_model

    a = load_final(toy_model(seed=1), tmp_path / "one").state_dict()
    b = load_final(toy_model(seed=1), tmp_path / "two").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sharded_sampling_over_two_gpus_matches_one():
    unet, clf = _sampling_models("cuda:0")
    unet1, clf1 = _sampling_models("cuda:1")
    labels, seeds = torch.arange(5) % 9, torch.arange(5) + 100
    kw = dict(guidance_scale=3.0, num_inference_steps=4, latent_shape=(4, 8, 8), progress=False)
    whole = sampling.guided_ddim_sample(unet, SCHED, labels, seeds, classifier=clf, device="cuda:0", **kw)
    parts = [sampling.guided_ddim_sample(u, SCHED, labels[list(r)], seeds[list(r)], classifier=c, device=d, **kw)
             for (u, c, d), r in zip([(unet, clf, "cuda:0"), (unet1, clf1, "cuda:1")],
                                     [sampling.shard(5, 0, 2), sampling.shard(5, 1, 2)])]
    assert torch.allclose(whole, torch.cat(parts), atol=2e-3)


PAPER = load_config(ROOT / "params/nct_crc.yaml", ["study.device=cuda"])


def _peak(step_fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step_fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1024 ** 3


def _paper_step(model, loss_fn, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@pytest.mark.parametrize("network", ["autoencoder", "denoiser", "latent_classifier", "downstream_vit"])
def test_one_paper_size_step_of_each_network(network, capsys):
    """One bf16 training step of each network at the paper's sizes (params/nct_crc.yaml), with its peak
    memory; the memory plan's micro-batch for this GPU is printed beside it."""
    from hdlib.evaluation.downstream import build_classifier
    from hdlib.training.memory_plan import (
        GB,
        budget_gb,
        plan_micro_batch,
        probe_train_step,
    )

    size, C = PAPER.data.image_size, PAPER.autoencoder.latent_channels
    S = size // 2 ** (len(PAPER.autoencoder.block_out_channels) - 1)
    if network == "autoencoder":
        model, batch = build_autoencoder(PAPER.autoencoder).cuda(), PAPER.autoencoder.train.batch_size
        loss = lambda m, n: autoencoder_loss(m, torch.rand(n, 3, size, size, device="cuda") * 2 - 1,  # noqa: E731
                                             torch.arange(n), 1e-6, 0.2)
    elif network == "denoiser":
        model, batch = build_unet(PAPER.diffusion, C, S).cuda(), PAPER.diffusion.pretrain.batch_size

        def loss(m, n):
            noise, t = draw_noise_and_timesteps(torch.arange(n), (C, S, S), 1000)
            return diffusion_loss(m, torch.randn(n, C, S, S, device="cuda"), noise.cuda(), t.cuda(), SCHED)
    elif network == "latent_classifier":
        model = build_latent_classifier(PAPER.latent_classifier, C, S, 9,
                                        encoder_unet=build_unet(PAPER.diffusion, C, S)).cuda()
        batch = PAPER.latent_classifier.train.batch_size
        loss = lambda m, n: torch.nn.functional.cross_entropy(  # noqa: E731
            m(torch.randn(n, C, S, S, device="cuda"), torch.randint(0, 1000, (n,), device="cuda")),
            torch.randint(0, 9, (n,), device="cuda"))
    else:
        model = build_classifier(PAPER.downstream.backbone, 9, image_size=size).cuda()
        batch = PAPER.downstream.train.batch_size
        loss = lambda m, n: torch.nn.functional.cross_entropy(  # noqa: E731
            m(torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8, device="cuda")),
            torch.randint(0, 9, (n,), device="cuda"))
    model.train()
    mem = probe_train_step(model, lambda n: loss(model, n), torch.cuda.reset_peak_memory_stats,
                           torch.cuda.max_memory_allocated)
    budget = budget_gb(0, "cuda")
    micro = plan_micro_batch(batch, mem, budget, what=network)
    peak = _peak(_paper_step(model, lambda m: loss(m, micro), micro))
    assert peak <= budget
    with capsys.disabled():
        print(f"\n[paper step] {network} on {torch.cuda.get_device_name()}: batch {batch} as micro-batches of "
              f"{micro}; per image {mem.per_image_gb:.3f} GB, fixed {mem.fixed_gb:.2f} GB, peak {peak:.2f} GB "
              f"of {budget:.0f} GB ({torch.cuda.get_device_properties(0).total_memory / GB:.0f} GB device)")
