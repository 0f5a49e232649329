"""The generic training loop behind every trainable model of the study, on accelerate.

The same code runs on 1 CPU, 1 GPU or N processes (`torchrun`, `accelerate
launch`). Data order and per-sample randomness depend only on (seed, step):

* the global batch of step s is a slice of the stream formed by concatenating
  per-epoch permutations (epoch e's permutation is seeded by (seed, e));
* every sample of the global batch gets an int64 *sample seed* from
  (seed, s, position); the task's `loss_fn` draws noise/timesteps from it.

So a resumed run needs no data-loader state and reproduces the uninterrupted
loss curve (bit-identical on the CPU), and a 2-process run sees exactly the
samples and noise of a 1-process run with the same global batch. Settings:
hdlib.training_config; batch plans: hdlib.batching; weight files: hdlib.weights.

Layout of `out_dir`::

    train_config.json            the TrainConfig of the latest call
    log.csv                      step, loss, lr, grad_norm, images_per_s, elapsed_s
    checkpoints/step-00000123/   accelerate save_state + meta.json + COMPLETE
    final/model/  final/ema/     weights (save_pretrained or model.safetensors)
    final/result.json  final/COMPLETE
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError, HDLibError
from ..io import atomic_write_json, atomic_write_text
from ..parallel.progress import Progress as ProgressReport
from .batching import BatchPlan
from .memory_plan import (
    budget_gb,
    cuda_peak_meter,
    plan_micro_batch,
    probe_sizes,
    probe_train_step,
)
from .runtime import LossModule, Progress, make_accelerator
from .settings import TrainConfig, TrainResult, lr_scheduler
from .weights import save_weights

LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s")


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _checked_modules_and_data(extra_modules, dataset) -> tuple[dict, int]:
    """extra_modules as a dict of named nn.Modules, and the dataset's length (>= 1), each checked."""
    extra = dict(extra_modules or {})
    for name, mod in extra.items():
        if not name.isidentifier() or name in ("model", "ema"):
            raise ConfigError(f"extra_modules: bad name {name!r} (an identifier other than 'model'/'ema')")
        if not isinstance(mod, nn.Module):
            raise ConfigError(f"extra_modules[{name!r}] is a {type(mod).__name__}, not an nn.Module")
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"dataset {type(dataset).__name__} has no len()") from None
    if n < 1:
        raise DataError("training dataset is empty")
    return extra, n


class Trainer:
    """Train `model` by minimising `loss_fn(model, batch, sample_seeds, **extra_modules)`.

    dataset: `len()` and `dataset[LongTensor idx] -> batch` (a tensor, tuple or dict of
    tensors), e.g. TensorBatchSource or a LatentSource; or a streaming source with
    `batches(index_lists)` (hdlib.data.streaming.StreamingSource: items decoded by DataLoader
    workers). Under several processes each rank reads only its slice of the global batch.
    loss_fn returns the scalar mean loss over its micro-batch, drawing any randomness
    from the per-sample int64 seeds. extra_modules: {name: module} trained jointly with
    the model (trainable parameters join the optimizer; frozen ones just follow the
    device), checkpointed, and saved to final/<name>/; they are passed to loss_fn by name.

    plan: which dataset rows and per-sample seeds make the global batch of each step
    (default `BatchPlan`: seeded epoch permutations); any object with `__call__(step)`
    -> (indices, seeds) and `batch` (e.g. `GroupPlan`: class-balanced real + synthetic parts).
    evaluate: model selection. Every `eval_every` steps and at the end, rank 0 calls
    `evaluate(model)` (EMA weights where there is an EMA) -> dict of numbers, appended to
    eval.csv; the weights whose `select(metrics)` (a tuple, larger is better) is best so far
    are kept with the run and exported to final/best/ (`load_final(..., module="best")`).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset, config: TrainConfig,
                 extra_modules: dict[str, nn.Module] | None = None, find_unused_parameters: bool = False,
                 plan=None, evaluate: Callable[[nn.Module], dict] | None = None, eval_every: int = 0,
                 select: Callable[[dict], tuple] | None = None):
        config.validate()
        extra, n = _checked_modules_and_data(extra_modules, dataset)
        self.config = c = config
        self.dataset = dataset
        self.out_dir = Path(c.out_dir)
        self.checkpoint_root = self.out_dir / "checkpoints"
        self.final_dir = self.out_dir / "final"
        self.accelerator = acc = make_accelerator(c.mixed_precision, find_unused_parameters, c.device)
        self._set_batching(acc.num_processes, plan, n)
        if evaluate is not None and (select is None or eval_every < 1):
            raise ConfigError("evaluate needs select and eval_every >= 1")
        self.evaluate, self.eval_every, self.select = evaluate, int(eval_every), select
        self._stream = None

        self._unwrapped = LossModule(model, loss_fn, extra)
        trainable = [p for p in self._unwrapped.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("the model (and extra_modules) have no trainable parameters")
        optimizer = torch.optim.AdamW(trainable, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        # Not passed through accelerator.prepare: its wrapper steps once per process.
        self.lr_scheduler = lr_scheduler(optimizer, c)
        self.ema = None
        if c.ema_decay:
            from diffusers.training_utils import (
                EMAModel,  # imported only when needed: slow to import
            )

            self.ema = EMAModel(model.parameters(), decay=c.ema_decay, foreach=True)
        self.progress_state = Progress()
        self.loss_module, self.optimizer = acc.prepare(self._unwrapped, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler, self.progress_state)
        if self.ema is not None:
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self._seed_global_rngs()

    def _set_batching(self, world: int, plan, n: int) -> None:
        """Per-process batch, micro-batch, accumulation and the batch plan, each checked against the others."""
        c = self.config
        if c.global_batch_size % world:
            raise ConfigError(f"global_batch_size {c.global_batch_size} is not divisible by the "
                              f"{world} processes")
        self.per_process_batch = c.global_batch_size // world
        self.micro_batch_size = c.micro_batch_size or self.per_process_batch
        self._memory_planned = c.micro_batch_size is not None  # a configured micro-batch is kept as it is
        self.memory_plan: dict | None = None
        if c.global_batch_size % (world * self.micro_batch_size):
            raise ConfigError(f"global_batch_size {c.global_batch_size} is not divisible by {world} process(es) "
                              f"x micro_batch_size {self.micro_batch_size}")
        self.accumulation_steps = self.per_process_batch // self.micro_batch_size
        self.plan = plan if plan is not None else BatchPlan(c.seed, n, c.global_batch_size)
        if int(self.plan.batch) != c.global_batch_size:
            raise ConfigError(f"plan batch {self.plan.batch} differs from global_batch_size {c.global_batch_size}")

    # -- public state -------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model being trained (unwrapped: the module passed in)."""
        return self._unwrapped.model

    @property
    def extra_modules(self) -> dict[str, nn.Module]:
        return dict(self._unwrapped.extra.items())

    @property
    def step(self) -> int:
        return self.progress_state.step

    def _seed_global_rngs(self):
        # Only model-internal randomness (dropout) uses the global RNGs; seeding them per
        # process makes it reproducible, and checkpoints restore them on resume.
        import random

        rank = self.accelerator.process_index
        random.seed(self.config.seed * 1000 + rank)
        np.random.seed((self.config.seed * 1000 + rank) % 2**32)
        torch.manual_seed(self.config.seed * 1000 + rank)

    # -- checkpoints ----------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (ones without COMPLETE are ignored)."""
        if not self.checkpoint_root.is_dir():
            return []
        found = [p for p in self.checkpoint_root.glob("step-*") if p.is_dir() and (p / "COMPLETE").exists()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step atomically (all processes must call it)."""
        acc, step = self.accelerator, self.step
        final = self.checkpoint_root / _step_dir_name(step)
        tmp = self.checkpoint_root / f"tmp-{_step_dir_name(step)}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its own RNG state
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {"step": step, "world_size": acc.num_processes, "config": self.config.to_dict()}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            (tmp / "COMPLETE").write_text(f"{step}\n")
            if final.exists():  # a re-save of the same step: move the old one out of the way first
                old = self.checkpoint_root / f"old-{_step_dir_name(step)}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            for stale in self.complete_checkpoints()[:-self.config.checkpoints_total_limit]:
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path | None = None) -> int:
        """Restore model, optimizer, scheduler, EMA, RNG states and step from `path`
        (default: the latest complete checkpoint); returns the step (0 if there is none)."""
        path = Path(path) if path is not None else self.latest_checkpoint()
        if path is None:
            return 0
        if not (path / "COMPLETE").exists():
            raise HDLibError(f"{path}: incomplete checkpoint (no COMPLETE marker)")
        meta = json.loads((path / "meta.json").read_text())
        saved = TrainConfig(**{**meta["config"], "betas": tuple(meta["config"]["betas"])})
        diff = self.config.continues(saved, meta["step"],
                                     ignore=("mixed_precision",) if self.config.precision_may_change else ())
        if diff and self.config.replace_stale:
            self._clear_stale(diff)
            return 0
        if diff:
            raise ConfigError(f"{path}: checkpoint was made with other settings ({', '.join(diff)}); "
                              f"use another out_dir or delete {self.out_dir}")
        if meta["step"] > self.config.max_steps:
            raise ConfigError(f"{path}: checkpoint step {meta['step']} is beyond max_steps {self.config.max_steps}")
        self.accelerator.load_state(str(path))
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        if saved.mixed_precision != self.config.mixed_precision:
            self._record_precision_change(meta["step"], saved.mixed_precision)
        return self.step

    def _clear_stale(self, diff: list[str]) -> None:
        """Checkpoints and final weights of another run in this folder: a stale cache, removed before training anew."""
        acc = self.accelerator
        if acc.is_main_process:
            print(f"[train] {self.out_dir.name}: its checkpoints were made with other {', '.join(diff)}; training anew",
                  flush=True)
            for folder in (self.checkpoint_root, self.final_dir):
                shutil.rmtree(folder, ignore_errors=True)
        acc.wait_for_everyone()

    def _record_precision_change(self, step: int, before: str) -> None:
        """A resume in another precision (allowed with precision_may_change) is part of the run's history."""
        if not self.accelerator.is_main_process:
            return
        path = self.out_dir / "precision_changes.csv"
        new = not path.exists()
        with open(path, "a") as f:
            f.write(("step,from,to\n" if new else "") + f"{step},{before},{self.config.mixed_precision}\n")

    # -- log --------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.csv"

    def _reset_log(self, keep_until_step: int) -> None:
        """Keep the rows up to the resumed step (a killed run may have logged further, or half a line)."""
        kept = []
        if keep_until_step > 0 and self.log_path.exists():
            for row in csv.reader(io.StringIO(self.log_path.read_text())):
                if len(row) == len(LOG_FIELDS) and row[0].isdigit() and int(row[0]) <= keep_until_step:
                    kept.append(row)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LOG_FIELDS)
        w.writerows(kept)
        atomic_write_text(self.log_path, buf.getvalue())

    # -- final ------------------------------------------------------------------------
    def _final_is_done(self) -> bool:
        marker = self.final_dir / "COMPLETE"
        if not marker.exists():
            return False
        done = json.loads(marker.read_text())
        return done.get("trajectory") == self.config.trajectory_key() and done.get("step") == self.config.max_steps

    def _read_result(self) -> TrainResult:
        return TrainResult(**json.loads((self.final_dir / "result.json").read_text()))

    def _evaluate_and_select(self) -> None:
        """Score the current weights (EMA where kept); keep them if they are the best so far.
        Every process runs it (same numbers on each), so no process waits for another."""
        prog, model = self.progress_state, self.model
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = {k: float(v) for k, v in self.evaluate(model).items()}
            key = [float(v) for v in self.select(metrics)]
            improved = prog.best_key is None or key > prog.best_key
            if improved:
                prog.best_key, prog.best_step = key, prog.step
                prog.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            prog.evals.append({"step": prog.step, **metrics, "improved": bool(improved)})
        finally:
            model.train(was_training)
            if self.ema is not None:
                self.ema.restore(model.parameters())
        if self.accelerator.is_main_process:
            buf = io.StringIO()
            fields = list(dict.fromkeys(k for row in prog.evals for k in row))
            w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
            w.writeheader()
            w.writerows(prog.evals)
            atomic_write_text(self.out_dir / "eval.csv", buf.getvalue())

    def _export_final(self, result: TrainResult) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        tmp = self.out_dir / "final-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.model
        save_weights(model, tmp / "model")
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
            save_weights(model, tmp / "ema")
            self.ema.restore(model.parameters())
        for name, mod in self.extra_modules.items():
            save_weights(mod, tmp / name)
        if self.progress_state.best_state is not None:
            current = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.progress_state.best_state)
            save_weights(model, tmp / "best")
            model.load_state_dict(current)
            (tmp / "best" / "selection.json").write_text(json.dumps(
                {"step": self.progress_state.best_step, "key": self.progress_state.best_key}))
        (tmp / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
        (tmp / "COMPLETE").write_text(json.dumps({"step": self.step, "trajectory": self.config.trajectory_key(),
                                                  "ema": self.ema is not None}))
        if self.final_dir.exists():
            old = self.out_dir / "final-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, self.final_dir)

    # -- memory plan ------------------------------------------------------------------
    def plan_memory(self, step: int) -> int:
        """On a GPU without a configured micro-batch: measure this run's step at two sizes (1 and 2 images;
        2 and 4 with BatchNorm) and take the largest micro-batch that divides the per-process batch and fits
        the budget (hdlib.training.memory_plan). Every process takes the smallest of all their plans.
        Returns the micro-batch."""
        acc = self.accelerator
        budget = budget_gb(self.config.max_memory_gb, acc.device)
        sizes = probe_sizes(self._unwrapped, self.per_process_batch)
        if self._memory_planned or budget is None or acc.device.type != "cuda" or sizes is None:
            self._memory_planned = True
            return self.micro_batch_size
        idx, seeds = self.plan(step)
        lo = acc.process_index * self.per_process_batch
        idx, seeds = idx[lo:lo + sizes[1]], seeds[lo:lo + sizes[1]]
        if hasattr(self.dataset, "batches"):
            from accelerate.utils import send_to_device

            rows = send_to_device(next(iter(self.dataset.batches([idx.tolist()]))), acc.device)
        else:
            rows = self._batch(idx)
        take = (lambda n: type(rows)(r[:n] for r in rows)) if isinstance(rows, (tuple, list)) else \
            (lambda n: {k: v[:n] for k, v in rows.items()}) if isinstance(rows, dict) else (lambda n: rows[:n])
        reset, peak = cuda_peak_meter(acc.device)
        with acc.no_sync(self.loss_module):
            step_mem = probe_train_step(self._unwrapped, lambda n: self.loss_module(take(n), seeds[:n]), reset, peak,
                                        sizes=sizes)
        micro = plan_micro_batch(self.per_process_batch, step_mem, budget, what=str(self.out_dir.name),
                                 min_micro=sizes[0])
        micro = int(acc.gather(torch.tensor([micro], device=acc.device)).min())
        self.micro_batch_size, self.accumulation_steps = micro, self.per_process_batch // micro
        self.memory_plan = {"budget_gb": budget, "fixed_gb": step_mem.fixed_gb, "per_image_gb": step_mem.per_image_gb,
                            "micro_batch_size": micro, "accumulation_steps": self.accumulation_steps}
        self._memory_planned = True
        if acc.is_main_process:
            atomic_write_json(self.out_dir / "memory_plan.json", self.memory_plan)
        return micro

    # -- training ---------------------------------------------------------------------
    def _batch(self, idx: torch.Tensor):
        from accelerate.utils import send_to_device

        if self._stream is not None:  # a per-item dataset: the loader already fetched these rows
            return send_to_device(next(self._stream), self.accelerator.device)
        return send_to_device(self.dataset[idx], self.accelerator.device)

    def _index_lists(self, start: int):
        """This process's micro-batch row lists of every step from `start`, for a streaming
        source's DataLoader (so its workers fetch ahead while the model trains)."""
        lo = self.accelerator.process_index * self.per_process_batch
        for step in range(start, self.config.max_steps):
            idx = self.plan.indices(step)[lo:lo + self.per_process_batch]
            for m in range(self.accumulation_steps):
                yield idx[m * self.micro_batch_size:(m + 1) * self.micro_batch_size].tolist()

    def _train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the global batch of `step`; returns (loss, grad_norm) as
        device tensors (loss averaged over processes)."""
        acc, c = self.accelerator, self.config
        idx, seeds = self.plan(step)
        lo = acc.process_index * self.per_process_batch
        idx, seeds = idx[lo:lo + self.per_process_batch], seeds[lo:lo + self.per_process_batch]
        total = torch.zeros((), device=acc.device)
        for m in range(self.accumulation_steps):
            sl = slice(m * self.micro_batch_size, (m + 1) * self.micro_batch_size)
            last = m == self.accumulation_steps - 1
            # gradients are all-reduced only on the last micro-batch
            with (acc.no_sync(self.loss_module) if not last else _null()):
                loss = self.loss_module(self._batch(idx[sl]), seeds[sl])
                if loss.ndim != 0:
                    raise HDLibError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}, expected a scalar")
                acc.backward(loss / self.accumulation_steps)
            total += loss.detach().float() / self.accumulation_steps
        # the norm is measured even without clipping (max_norm=inf leaves the gradients unchanged)
        grad_norm = acc.clip_grad_norm_(self.optimizer_params, c.grad_clip if c.grad_clip else float("inf"))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        return acc.reduce(total, reduction="mean"), torch.as_tensor(grad_norm, device=acc.device).detach().float()

    @property
    def optimizer_params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _resume(self) -> int:
        """The step to start from: the latest complete checkpoint's (restored), or 0; the log is cut back
        to it and a killed save's leftovers removed."""
        acc = self.accelerator
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out_dir / "train_config.json", self.config.to_dict())
        start = self.load_checkpoint()
        if acc.is_main_process:
            self._reset_log(start)
            for stale in self.checkpoint_root.glob("tmp-*") if self.checkpoint_root.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
        acc.wait_for_everyone()
        return start

    def _log_interval(self, lr: float, interval: dict, log_file, bar) -> float:
        """Close a log interval: mean loss and gradient norm since the last row, throughput; a log row
        (rank 0) and the bar's figures. Returns the interval's mean loss (a non-finite one stops training)."""
        prog = self.progress_state
        last_loss = (prog.loss_sum / prog.count).item()
        mean_gn = (prog.grad_norm_sum / prog.count).item()
        if not math.isfinite(last_loss):
            raise HDLibError(f"{self.out_dir}: training diverged, loss is {last_loss} at step {prog.step}")
        now = time.perf_counter()
        ips = interval["images"] / max(now - interval["t"], 1e-9)
        interval["t"], interval["images"] = now, 0
        prog.loss_sum.zero_()
        prog.grad_norm_sum.zero_()
        prog.count = 0
        if log_file is not None:
            csv.writer(log_file, lineterminator="\n").writerow(
                [prog.step, repr(last_loss), repr(float(lr)), repr(mean_gn), f"{ips:.2f}", f"{prog.elapsed_s:.3f}"])
            log_file.flush()
        bar.set_postfix(loss=f"{last_loss:.4g}", img_s=f"{ips:.0f}")
        return last_loss

    def train(self) -> TrainResult:
        """Train to max_steps, resuming from the latest complete checkpoint in out_dir/checkpoints;
        returns at once if out_dir/final already holds this run."""
        from tqdm import tqdm

        acc, c = self.accelerator, self.config
        if self._final_is_done():
            return self._read_result()
        start = self._resume()
        self.plan_memory(start)

        self._stream = iter(self.dataset.batches(self._index_lists(start))) if hasattr(self.dataset, "batches") \
            else None
        prog = self.progress_state
        prog.loss_sum = prog.loss_sum.to(acc.device)
        prog.grad_norm_sum = prog.grad_norm_sum.to(acc.device)
        t_start = time.perf_counter()
        elapsed_before = prog.elapsed_s
        last_loss = float("nan")
        bar = tqdm(total=c.max_steps, initial=start, desc=self.out_dir.name, dynamic_ncols=True,
                   disable=not (c.progress and acc.is_main_process))
        # the runner's live line while a stage runs (no bar in the notebook); rank 0 reports
        channel = ProgressReport(f"training {self.out_dir.name}", c.max_steps, "steps", start=start) \
            if acc.is_main_process else None
        self.loss_module.train()
        log_file = open(self.log_path, "a", newline="") if acc.is_main_process else None
        interval = {"t": t_start, "images": 0}
        try:
            for step in range(start, c.max_steps):
                lr = self.lr_scheduler.get_last_lr()[0]  # the lr this step uses
                loss, grad_norm = self._train_step(step)
                prog.step = step + 1
                prog.loss_sum += loss.double()
                prog.grad_norm_sum += grad_norm.double()
                prog.count += 1
                interval["images"] += c.global_batch_size
                prog.elapsed_s = elapsed_before + time.perf_counter() - t_start
                if prog.step % c.log_every == 0 or prog.step == c.max_steps:
                    last_loss = self._log_interval(lr, interval, log_file, bar)
                bar.update(1)
                if channel is not None:
                    channel.update(1)
                if self.evaluate is not None and (prog.step % self.eval_every == 0 or prog.step == c.max_steps):
                    self._evaluate_and_select()
                if prog.step % c.checkpointing_steps == 0 or prog.step == c.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        result = self._result(start, time.perf_counter() - t_start, last_loss)
        acc.wait_for_everyone()
        self._export_final(result)
        acc.wait_for_everyone()
        return result

    def _result(self, start: int, wall: float, last_loss: float) -> TrainResult:
        c = self.config
        if math.isnan(last_loss) and self.log_path.exists():  # nothing left to train: report the last logged loss
            rows = list(csv.DictReader(io.StringIO(self.log_path.read_text())))
            last_loss = float(rows[-1]["loss"]) if rows else float("nan")
        weights = self.final_dir / ("ema" if self.ema is not None else "model")
        return TrainResult(step=self.step, last_loss=last_loss, final_dir=str(self.final_dir),
                           weights_dir=str(weights), wall_s=wall,
                           images_per_s=(self.step - start) * c.global_batch_size / max(wall, 1e-9),
                           resumed_from_step=start)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
