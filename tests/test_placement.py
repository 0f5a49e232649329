"""Device placement, checked on the CPU: entry points refuse a module left on another device, and
stage code moves what it loads to the study's device. A `meta` device stands in for a GPU: a module
that is not moved stays on the CPU, and the entry point's check names it."""

import pytest
import torch

from hdlib.config import load_config
from hdlib.models.builders import build_latent_classifier, build_unet
from hdlib.models.diffusion import make_noise_scheduler
from hdlib.placement import DevicePlacementError, check_placement, same_device
from hdlib.sampling import samplers as sampling
from hdlib.sampling.pipeline import ClassifierGuidance, GuidedLatentPipeline

SMOKE = load_config("params/smoke.yaml")


def _unet():
    return build_unet(SMOKE.diffusion, 4, 8).eval()


def _check_only_sampler(calls):
    """A sampler that makes the real samplers' pre-compute checks (placement included) and returns zeros."""
    def sampler(unet, scheduler, labels, seeds, *, latent_shape, device, classifier=None, guidance_scale=0.0,
                num_inference_steps=4, batch_size=64, guidance_interval=None, **_):
        cond = ClassifierGuidance(classifier) if classifier is not None else None
        GuidedLatentPipeline(unet, scheduler)._check(labels, seeds, latent_shape, "ddim", num_inference_steps,
                                                     batch_size, cond, guidance_scale, guidance_interval, None, device)
        calls.append(device)
        return torch.zeros(len(labels), *latent_shape)
    return sampler


def test_same_device_treats_a_missing_index_as_any():
    assert same_device("cuda", "cuda:0") and same_device("cpu", torch.device("cpu"))
    assert not same_device("cuda:0", "cuda:1") and not same_device("cpu", "meta")


def test_sampler_refuses_a_classifier_left_on_the_cpu():
    # what tests/test_gpu.py used to do: the U-Net on the device, the latent classifier not
    unet = _unet().to("meta")
    clf = build_latent_classifier(SMOKE.latent_classifier, 4, 8, 9, encoder_unet=_unet()).eval()
    with pytest.raises(DevicePlacementError, match="classifier is on cpu but this runs on meta"):
        sampling.guided_ddim_sample(unet, make_noise_scheduler("paper"), [0], [1], classifier=clf, guidance_scale=3.0,
                                    num_inference_steps=2, latent_shape=(4, 8, 8), device="meta", progress=False)


@pytest.mark.parametrize("method", ["guided_ddim_sample", "guided_ddpm_sample", "guided_dpm_solver_sample"])
def test_every_sampler_checks_the_unet(method):
    with pytest.raises(DevicePlacementError, match="unet is on cpu"):
        getattr(sampling, method)(_unet(), make_noise_scheduler("paper"), [0], [1], num_inference_steps=2,
                                  latent_shape=(4, 8, 8), device="meta", progress=False)


def test_unguided_sampling_ignores_an_unused_classifier():
    check_placement("x", "meta", unet=_unet().to("meta"), classifier=None)


def test_stage02_moves_the_denoiser_to_the_study_device(monkeypatch):
    """Stage 02's sample comparison loaded the denoiser on the CPU and sampled on the study's device:
    on a GPU the first U-Net call failed with a device mismatch, right after pre-training."""
    from hdlib.stages import diffusion as stage

    calls = []
    monkeypatch.setattr(stage, "device", lambda cfg: "meta")
    monkeypatch.setattr(stage, "load_autoencoder", lambda cfg: None)
    monkeypatch.setattr(stage, "noise_scheduler", lambda cfg: make_noise_scheduler("paper"))
    monkeypatch.setattr(stage, "latent_scale", lambda cfg: 1.0)
    monkeypatch.setattr(stage, "latent_shape", lambda cfg: (4, 8, 8))
    monkeypatch.setattr(stage, "request_seeds", lambda cfg, tag, n: list(range(n)))
    monkeypatch.setattr(stage, "load_denoiser", lambda cfg, name: _unet())  # as the real one: on the CPU
    monkeypatch.setattr(stage, "guided_ddim_sample", _check_only_sampler(calls))
    out = stage.unconditional_samples(SMOKE, ["denoiser_pretrained"], 3, "test", decode=False)
    assert calls == ["meta"] and out["denoiser_pretrained"][0].shape == (3, 4, 8, 8)


def test_pretrain_samples_move_the_unet(monkeypatch):
    from hdlib.pretrain import samples

    calls = []
    monkeypatch.setattr(samples, "guided_ddim_sample", _check_only_sampler(calls))
    monkeypatch.setattr(samples, "decode_latents", lambda vae, z, scale, device: z)
    samples.sample_images(_unet(), make_noise_scheduler("paper"), None, 1.0, 2, 2, device="meta")
    assert calls == ["meta"]


# ------------------------------------------------------------------ study.device, several GPUs, config checks

def test_study_device_cpu_keeps_training_on_the_cpu_beside_a_gpu(monkeypatch):
    from hdlib.training.runtime import trains_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert trains_on_cpu("cpu")  # before: accelerate took the GPU whatever study.device said
    assert not trains_on_cpu("auto") and not trains_on_cpu("cuda")


def test_trainer_settings_carry_the_study_device():
    from hdlib.training.settings import TrainConfig

    tc = TrainConfig.from_settings(SMOKE.diffusion.pretrain, out_dir="x", seed=0, device="cpu")
    assert tc.device == "cpu" and "device" not in tc.trajectory_key()  # a resume may move devices


def test_a_launched_rank_uses_its_own_gpu(monkeypatch):
    from hdlib.study.context import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config("params/smoke.yaml", ["study.device=cuda"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device(cfg) == "cuda:1"
    monkeypatch.delenv("LOCAL_RANK")
    assert device(cfg) == "cuda"


def test_auto_never_falls_back_to_the_cpu_quietly_beside_an_unusable_gpu(monkeypatch):
    from hdlib import config
    from hdlib.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config, "nvidia_gpu_present", lambda: True)
    with pytest.raises(ConfigError, match="cannot use") as err:
        config.resolve_device("auto")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(config, "nvidia_gpu_present", lambda: False)
    assert config.resolve_device("auto") == "cpu"


def test_a_gpu_study_without_a_gpu_fails_before_stage_00(tmp_path, monkeypatch):
    from hdlib.errors import ConfigError
    from hdlib.tools.runner import run_study

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run_study("params/smoke.yaml", [f"study.results_root={tmp_path}", "study.device=cuda"], log=lambda *_: None)
    assert not any(tmp_path.iterdir())


def test_num_processes_must_divide_every_batch_at_load():
    from hdlib.config import training_settings
    from hdlib.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\.batch_size: \d+ is not divisible by study\.num_processes 3") as err:
        load_config("params/smoke.yaml", ["study.num_processes=3", "diffusion.pretrain.batch_size=64"])
    assert "\n" not in str(err.value)
    ok = load_config("params/default.yaml", ["study.num_processes=2"])  # every batch of the default study is even
    assert all(t.batch_size % 2 == 0 for t in training_settings(ok).values())
    assert "downstream.train" in training_settings(ok) and "diffusion.pretrain" in training_settings(ok)


def test_grid_workers_each_get_their_own_gpu(tmp_path):
    import sys
    from pathlib import Path

    from hdlib.parallel.grid import run_grid, worker_count

    sys.path.insert(0, str(Path(__file__).parent))
    assert worker_count(4, ["0", "1"]) == 2 and worker_count(4, None) == 4
    cells = [{"k": i, "sleep": 0.3} for i in range(6)]
    df = run_grid(cells, "_grid_cells:device_cell", tmp_path, workers=4, devices=["0", "1"], progress=False)
    by_pid = df.groupby("pid")["visible"].agg(set)
    assert set(df["visible"]) <= {"0", "1"} and all(len(v) == 1 for v in by_pid)  # one GPU per worker
    assert len(by_pid) <= 2  # never more workers than GPUs
    if len(by_pid) == 2:
        assert {next(iter(v)) for v in by_pid} == {"0", "1"}  # distinct GPUs


def test_an_empty_shard_decodes_to_no_images():
    from hdlib.models.builders import build_autoencoder, decode_latents, encode_images

    vae = build_autoencoder(SMOKE.autoencoder)
    out = decode_latents(vae, torch.empty(0, 4, 4, 4))
    assert out.shape == (0, 3, 16, 16) and out.dtype == torch.uint8
    assert encode_images(vae, torch.empty(0, 3, 16, 16, dtype=torch.uint8)).shape == (0, 4, 4, 4)


def test_other_ranks_wait_for_rank_zeros_file(tmp_path, monkeypatch):
    from hdlib.errors import HDLibError
    from hdlib.study.context import is_main_rank, wait_for_file

    monkeypatch.setenv("RANK", "1")
    assert not is_main_rank()
    with pytest.raises(HDLibError, match="did not appear"):
        wait_for_file(tmp_path / "t.csv", "a table", timeout_s=0.2, poll_s=0.05)
    (tmp_path / "t.csv").write_text("x\n")
    assert wait_for_file(tmp_path / "t.csv", "a table") == tmp_path / "t.csv"


DEVICE_BOUND = {"evaluate", "predict", "extract_features", "inception_fid", "sample_images", "decode_latents",
                "encode_images", "guided_ddim_sample", "guided_ddpm_sample", "guided_dpm_solver_sample",
                "cfg_ddim_sample"}


def test_every_device_bound_call_names_its_device():
    """Each call of a function that runs networks passes `device=` (their default is the CPU): a call
    without it ran on the CPU whatever study.device said (grid cells scored on the CPU, for one)."""
    import ast
    from pathlib import Path

    missing = []
    files = sorted(Path("hdlib").rglob("*.py")) + sorted(Path("notebooks/src").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                on_self = isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "self"
                if name in DEVICE_BOUND and not on_self and not any(k.arg in ("device", None) for k in node.keywords):
                    missing.append(f"{path}:{node.lineno} {name}")
    assert not missing, missing


def test_a_launched_process_knows_its_rank_from_the_launcher(monkeypatch):
    """Sampling and encoding shards come from the launcher's RANK / WORLD_SIZE: accelerate's PartialState()
    on a CPU said rank 0 of 1 in every process, so each process generated the whole request."""
    from hdlib.study.context import launched_rank

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_rank() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_rank() == (1, 2)
