"""The training engine: exact kill-and-resume, 1-vs-2-process equivalence, checkpoints,
gradient accumulation, EMA, extra modules and the final export."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hdlib.config import TrainingConfig
from hdlib.errors import ConfigError, DataError, HDLibError
from hdlib.parallel.launch import launch
from hdlib.training.batching import BatchPlan, TensorBatchSource
from hdlib.training.settings import TrainConfig, lr_scheduler
from hdlib.training.trainer import Trainer
from hdlib.training.weights import load_final

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_toy import toy_config, toy_data, toy_loss, toy_model  # noqa: E402

TOY = Path(__file__).resolve().parent / "_train_toy.py"
ROOT = Path(__file__).resolve().parent.parent


# The subprocess runs use one thread too: the same float reductions as in this process.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(out, **kw):
    t = Trainer(toy_model(), toy_loss(), toy_data(), toy_config(out, **kw))
    return t, t.train()


def _log(out):
    with open(Path(out) / "log.csv") as f:
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(f)]


def _weights(out, ema=False):
    return load_final(toy_model(seed=1), out, ema=ema).state_dict()


def _assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
    steps, a, b = 30, tmp_path / "a", tmp_path / "b"
    _, res_a = _train(a, max_steps=steps, ckpt_every=5, ema=0.9)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(TOY), "--out", str(b), "--max-steps", str(steps),
                             "--ckpt-every", "5", "--ema", "0.9", "--sleep", "0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not list((b / "checkpoints").glob("step-*/COMPLETE")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (b / "final").exists(), "the run finished before it was killed"

    t_b = Trainer(toy_model(), toy_loss(), toy_data(), toy_config(b, max_steps=steps, ckpt_every=5, ema=0.9))
    res_b = t_b.train()
    assert 0 < res_b.resumed_from_step < steps
    assert _log(b) == _log(a)  # loss, lr and grad-norm curves identical, no duplicated rows
    assert len(_log(a)) == steps
    _assert_state_equal(_weights(b), _weights(a))
    _assert_state_equal(_weights(b, ema=True), _weights(a, ema=True))
    assert res_b.last_loss == res_a.last_loss
    assert not list((b / "checkpoints").glob("tmp-*"))
    assert len(list((b / "checkpoints").glob("step-*"))) == 2  # checkpoints_total_limit


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_weights(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, max_steps=12, ckpt_every=100, ema=0.8)
    launch([str(TOY), "--out", str(two), "--max-steps", "12", "--ckpt-every", "100", "--ema", "0.8"],
           num_processes=2, backend="gloo", env={"PYTHONPATH": str(ROOT)},
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert (two / "checkpoints" / "step-00000012" / "random_states_1.pkl").exists()  # really 2 processes
    for ema in (False, True):
        w1, w2 = _weights(one, ema), _weights(two, ema)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
    l1, l2 = _log(one), _log(two)
    assert [r[0] for r in l1] == [r[0] for r in l2]
    for r1, r2 in zip(l1, l2):
        assert float(r2[1]) == pytest.approx(float(r1[1]), rel=1e-5)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    t1, _ = _train(tmp_path, max_steps=6, ckpt_every=3, ema=0.9)
    t2 = Trainer(toy_model(seed=99), toy_loss(), toy_data(), toy_config(tmp_path, max_steps=6, ckpt_every=3, ema=0.9))
    assert not torch.equal(t2.model[0].weight, t1.model[0].weight)
    assert t2.load_checkpoint() == 6
    _assert_state_equal(t2.model.state_dict(), t1.model.state_dict())
    s1, s2 = t1.optimizer.state_dict(), t2.optimizer.state_dict()
    assert s1["state"].keys() == s2["state"].keys() and s1["state"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert t2.lr_scheduler.state_dict()["last_epoch"] == t1.lr_scheduler.state_dict()["last_epoch"] == 6
    assert t2.ema.optimization_step == 6
    for p1, p2 in zip(t1.ema.shadow_params, t2.ema.shadow_params):
        assert torch.equal(p1, p2)


def test_incomplete_checkpoint_is_ignored_and_constant_lr_run_extends(tmp_path):
    _train(tmp_path, max_steps=6, ckpt_every=3)
    bogus = tmp_path / "checkpoints" / "step-00000099"  # a save killed before its COMPLETE marker
    bogus.mkdir()
    (bogus / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "checkpoints" / "tmp-step-00000009").mkdir()
    t = Trainer(toy_model(), toy_loss(), toy_data(), toy_config(tmp_path, max_steps=9, ckpt_every=3))
    assert t.latest_checkpoint().name == "step-00000006"
    res = t.train()
    assert res.resumed_from_step == 6 and res.step == 9
    assert not (tmp_path / "checkpoints" / "tmp-step-00000009").exists()
    # ... and it equals a run trained to 9 steps in one go
    _train(tmp_path / "ref", max_steps=9, ckpt_every=3)
    _assert_state_equal(_weights(tmp_path), _weights(tmp_path / "ref"))
    assert _log(tmp_path) == _log(tmp_path / "ref")


def test_finished_run_returns_at_once(tmp_path):
    _, first = _train(tmp_path, max_steps=4)
    calls = []

    def counting_loss(model, batch, seeds):
        calls.append(1)
        return toy_loss()(model, batch, seeds)

    again = Trainer(toy_model(), counting_loss, toy_data(), toy_config(tmp_path, max_steps=4)).train()
    assert calls == [] and again.last_loss == first.last_loss and again.step == 4
    assert (tmp_path / "train_config.json").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    _train(tmp_path, max_steps=4, ckpt_every=2)
    (tmp_path / "final" / "COMPLETE").unlink()
    t = Trainer(toy_model(), toy_loss(), toy_data(), toy_config(tmp_path, max_steps=4, ckpt_every=2, lr=5e-3))
    with pytest.raises(ConfigError, match="lr"):
        t.train()


def test_a_long_run_may_resume_in_another_precision_and_records_it(tmp_path):
    """Pre-training moves between CPUs with and without native bf16: with precision_may_change its resume
    may change mixed_precision (logged in precision_changes.csv); without it, the resume is refused."""
    _train(tmp_path, max_steps=4, ckpt_every=2, mixed_precision="bf16")
    (tmp_path / "final" / "COMPLETE").unlink()
    with pytest.raises(ConfigError, match="mixed_precision"):
        Trainer(toy_model(), toy_loss(), toy_data(), toy_config(tmp_path, max_steps=6, ckpt_every=2)).train()
    result = Trainer(toy_model(), toy_loss(), toy_data(),
                     toy_config(tmp_path, max_steps=6, ckpt_every=2, precision_may_change=True)).train()
    assert result.resumed_from_step == 4 and result.step == 6
    assert (tmp_path / "precision_changes.csv").read_text() == "step,from,to\n4,bf16,no\n"


def test_bf16_is_native_only_with_its_cpu_flags():
    from hdlib.training.runtime import cpu_bf16_is_native

    assert cpu_bf16_is_native("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n") is True
    assert cpu_bf16_is_native("flags\t\t: fpu amx_bf16 amx_tile\n") is True
    assert cpu_bf16_is_native("processor : 0\nflags : fpu avx2 fma\n") is False  # AMD EPYC Zen 3, say


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path):
    _train(tmp_path / "acc", max_steps=5, micro=2)
    _train(tmp_path / "one", max_steps=5, micro=8)
    w_acc, w_one = _weights(tmp_path / "acc"), _weights(tmp_path / "one")
    for k in w_one:
        torch.testing.assert_close(w_acc[k], w_one[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(w_one["0.weight"], toy_model().state_dict()["0.weight"])  # it did train


def test_bad_inputs_fail_early_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"global_batch_size 8 .*micro_batch_size 3") as e:
        Trainer(toy_model(), toy_loss(), toy_data(), toy_config(tmp_path, micro=3))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="lr_schedule"):
        toy_config(tmp_path, lr_schedule="linear").validate()
    with pytest.raises(DataError, match="tensor 1 has 3 rows"):
        TensorBatchSource(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(HDLibError, match="scalar"):
        Trainer(toy_model(), lambda m, b, s: (m(b[0]) - b[1]) ** 2, toy_data(), toy_config(tmp_path)).train()
    with pytest.raises(HDLibError, match="no finished training run"):
        load_final(toy_model(), tmp_path / "nothing")


def test_ema_weights_differ_and_load_final_returns_them(tmp_path):
    t, res = _train(tmp_path, max_steps=10, ema=0.9)
    raw, ema = _weights(tmp_path, ema=False), _weights(tmp_path, ema=True)
    assert not torch.equal(raw["0.weight"], ema["0.weight"])
    for (name, p), shadow in zip(t.model.named_parameters(), t.ema.shadow_params):
        assert torch.equal(ema[name], shadow)
        assert torch.equal(raw[name], p.detach())
    assert res.weights_dir.endswith("ema")
    assert torch.equal(load_final(lambda: toy_model(seed=3), tmp_path)[0].weight, ema["0.weight"])


def test_batch_plan_is_a_function_of_seed_and_step():
    plan = BatchPlan(seed=5, dataset_len=10, global_batch_size=4)
    idx = torch.cat([plan.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    fresh = BatchPlan(seed=5, dataset_len=10, global_batch_size=4)
    assert torch.equal(fresh.indices(3), plan.indices(3))
    assert torch.equal(fresh.sample_seeds(3), plan.sample_seeds(3))
    assert not torch.equal(plan.sample_seeds(3), plan.sample_seeds(4))
    assert not torch.equal(BatchPlan(6, 10, 4).indices(0), plan.indices(0))
    assert len(set(plan.sample_seeds(0).tolist())) == 4


def test_lr_schedule_is_diffusers_warmup_then_cosine_or_constant(tmp_path):
    def lrs(schedule):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = lr_scheduler(opt, TrainConfig(out_dir=str(tmp_path), max_steps=12, global_batch_size=1,
                                              warmup_steps=2, lr_schedule=schedule))
        out = []
        for _ in range(13):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    cosine, constant = lrs("cosine"), lrs("constant")
    assert cosine[:3] == [0.0, 0.5, 1.0] and cosine[7] == pytest.approx(0.5) and cosine[12] == pytest.approx(0.0)
    assert constant[:3] == [0.0, 0.5, 1.0] and constant[3:] == [1.0] * 10


def test_from_settings_is_the_one_yaml_to_trainer_translation(tmp_path):
    """YAML settings (0 = off) -> TrainConfig (None = off): batch_size is the global batch,
    the study's run settings come as arguments, and overrides replace any field."""
    yaml_like = TrainingConfig(max_steps=40, batch_size=12, micro_batch_size=0, lr=3e-4, warmup_steps=5,
                               weight_decay=0.01, grad_clip=0.0, ema_decay=0.0, checkpointing_steps=7)
    tc = TrainConfig.from_settings(yaml_like, out_dir=tmp_path, seed=9)
    assert tc == TrainConfig(out_dir=str(tmp_path), max_steps=40, global_batch_size=12, micro_batch_size=None,
                             lr=3e-4, weight_decay=0.01, warmup_steps=5, grad_clip=None, ema_decay=None,
                             mixed_precision="no", checkpointing_steps=7, seed=9, progress=False)
    on = TrainingConfig(batch_size=12, micro_batch_size=4, grad_clip=0.5, ema_decay=0.99)
    tc = TrainConfig.from_settings(on, out_dir=tmp_path, seed=1, mixed_precision="bf16", progress=True,
                                   lr_schedule="cosine", log_every=1, max_steps=3)
    assert (tc.micro_batch_size, tc.grad_clip, tc.ema_decay) == (4, 0.5, 0.99)
    assert (tc.mixed_precision, tc.progress, tc.lr_schedule, tc.log_every, tc.max_steps) == ("bf16", True, "cosine", 1, 3)
    tc.validate()
    # what checkpoints and train_config.json hold: keep it stable (a field added later has a default that
    # leaves the trajectory key of older checkpoints as it was, as cooldown_* does)
    assert list(tc.to_dict()) == [
        "out_dir", "max_steps", "global_batch_size", "micro_batch_size", "lr", "weight_decay", "betas", "warmup_steps",
        "lr_schedule", "cooldown_start", "cooldown_steps", "grad_clip", "ema_decay", "mixed_precision", "checkpointing_steps", "checkpoints_total_limit",
        "log_every", "seed", "progress", "device", "max_memory_gb", "precision_may_change", "task_key", "replace_stale"]
    moved = TrainConfig.from_settings(on, out_dir=tmp_path, seed=1, mixed_precision="bf16", progress=True,
                                      lr_schedule="cosine", log_every=1, max_steps=3, device="cpu", max_memory_gb=40)
    assert moved.trajectory_key() == tc.trajectory_key()  # where and in how many pieces it runs is not its trajectory
    with pytest.raises(TypeError, match="batch_size"):
        TrainConfig.from_settings(on, out_dir=tmp_path, seed=1, batch_size=3)  # a YAML name, not a TrainConfig field


def test_extra_modules_train_jointly_and_are_exported(tmp_path):
    head = torch.nn.Linear(1, 1)
    frozen = torch.nn.Linear(1, 1).requires_grad_(False)
    head0, frozen0 = head.weight.detach().clone(), frozen.weight.detach().clone()

    def loss_fn(model, batch, seeds, head, frozen):
        x, y = batch
        return ((frozen(head(model(x))) - y) ** 2).mean()

    t = Trainer(toy_model(), loss_fn, toy_data(), toy_config(tmp_path, max_steps=4),
                extra_modules={"head": head, "frozen": frozen})
    t.train()
    assert not torch.equal(head.weight, head0) and torch.equal(frozen.weight, frozen0)
    assert torch.equal(load_final(torch.nn.Linear(1, 1), tmp_path, module="head").weight, head.weight)
    with pytest.raises(ConfigError, match="'model'"):
        Trainer(toy_model(), loss_fn, toy_data(), toy_config(tmp_path / "x"), extra_modules={"model": head})


@pytest.mark.slow
def test_streaming_loader_shards_across_two_processes(tmp_path):
    """A per-item (streaming) dataset under 2 gloo processes: each rank reads only its part of
    every global batch, the two parts are disjoint, and together they read every item exactly
    once per epoch (48 items, global batch 8: 6 steps = 1 epoch, 12 steps = 2 epochs)."""
    log = tmp_path / "reads.txt"
    launch([str(TOY), "--out", str(tmp_path / "run"), "--max-steps", "12", "--ckpt-every", "100",
            "--stream-log", str(log)], num_processes=2, backend="gloo", env={"PYTHONPATH": str(ROOT)},
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    reads = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    by_rank = {r: [i for rr, i in reads if rr == r] for r in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == 12 * 4
    for epoch in range(2):
        part = [by_rank[r][epoch * 24:(epoch + 1) * 24] for r in (0, 1)]
        assert not set(part[0]) & set(part[1])
        assert sorted(part[0] + part[1]) == list(range(48))


def test_cool_down_branch_decays_lr_to_zero_from_its_trunk_checkpoint(tmp_path):
    """Warmup-stable-decay: a branch resumes the constant-lr trunk's checkpoint at cooldown_start (the same
    trajectory until there), then its lr falls linearly to 0; a trunk checkpoint past cooldown_start is refused."""
    _train(tmp_path / "trunk", max_steps=8, ckpt_every=4)
    branch = tmp_path / "branch"
    (branch / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copytree(tmp_path / "trunk" / "checkpoints" / "step-00000004", branch / "checkpoints" / "step-00000004")
    res = Trainer(toy_model(), toy_loss(), toy_data(),
                  toy_config(branch, max_steps=8, ckpt_every=4, cooldown_start=4, cooldown_steps=4)).train()
    assert res.resumed_from_step == 4 and res.step == 8
    # steps 5-8 (the branch's log starts at its resume): constant until step 4, then falling towards 0
    assert [float(r[2]) for r in _log(branch)] == pytest.approx([1e-2, 0.75e-2, 0.5e-2, 0.25e-2])
    assert [float(r[2]) for r in _log(tmp_path / "trunk")][4:] == pytest.approx([1e-2] * 4)
    late = tmp_path / "late"
    shutil.copytree(tmp_path / "trunk" / "checkpoints" / "step-00000008", late / "checkpoints" / "step-00000008")
    with pytest.raises(ConfigError, match="cooldown_start"):
        Trainer(toy_model(), toy_loss(), toy_data(),
                toy_config(late, max_steps=10, ckpt_every=4, cooldown_start=4, cooldown_steps=4)).train()


def test_a_cool_down_only_branches_a_constant_lr_run(tmp_path):
    with pytest.raises(ConfigError, match="lr_schedule"):
        toy_config(tmp_path, lr_schedule="cosine", cooldown_start=4, cooldown_steps=4).validate()
    # off, it leaves the key of runs made before cool-downs existed as it was
    assert "cooldown_start" not in toy_config(tmp_path).trajectory_key()


def test_a_study_model_of_another_task_key_is_trained_anew_and_the_same_key_is_reused(tmp_path):
    """A study task keys its run by what decides its weights besides TrainConfig (hdlib.study.task_keys):
    a folder made with another key (another loss, other images, another starting model) is a stale cache
    and is trained anew, one made before task keys existed too; the same key is reused at once. Without
    replace_stale (a long run's checkpoints) another key is refused."""
    _, first = _train(tmp_path, max_steps=4, ckpt_every=2, task_key="a", replace_stale=True)
    calls = []

    def counting_loss(model, batch, seeds):
        calls.append(1)
        return toy_loss()(model, batch, seeds)

    def again(key, **kw):
        return Trainer(toy_model(), counting_loss, toy_data(),
                       toy_config(tmp_path, max_steps=4, ckpt_every=2, task_key=key, **kw)).train()

    assert again("a", replace_stale=True).step == 4 and calls == []  # the same key: reused
    with pytest.raises(ConfigError, match="task_key"):
        (tmp_path / "final" / "COMPLETE").unlink()
        again("b")
    result = again("b", replace_stale=True)
    assert len(calls) == 4 and result.resumed_from_step == 0 and [r[0] for r in _log(tmp_path)] == ["1", "2", "3", "4"]
    before_keys = tmp_path / "old"
    _train(before_keys, max_steps=4, ckpt_every=2)  # no task key: a run made before keys existed
    calls.clear()
    Trainer(toy_model(), counting_loss, toy_data(),
            toy_config(before_keys, max_steps=4, ckpt_every=2, task_key="a", replace_stale=True)).train()
    assert len(calls) == 4
    assert "task_key" not in toy_config(tmp_path).trajectory_key()  # an unkeyed run keeps its old key
