"""Training and guided-sampling throughput of every network at the PAPER sizes
(params/nct_crc.yaml), in fp32 and bf16: is a GPU ready for the paper-scale study?

    python bench/bench_paper.py [--device auto|cpu|cuda] [--precision fp32 bf16] [--steps 3]
                                [--batch 2 | --batch ae=8 unet=16 classifier=64 vit=128 sampling=32]
                                [--models ae unet classifier vit sampling] [--compile] [--channels-last]
                                [--threads N] [--row-timeout 900] [--markdown]

Networks (all from hdlib's builders, randomly initialised: speed does not depend on the weights):
  ae          AutoencoderKL 256x256x3 -> 64x64x3 (f=4, channels 128/256/512), loss `autoencoder_loss`
              (L1 + KL + SSIM)
  unet        UNet2DModel 192 x (1,2,2,4,4), attention at 64/32/16/8, on 3x64x64 latents, loss
              `diffusion_loss` (the config's L1), noise and timesteps drawn per sample as in training
  classifier  the noise-aware latent classifier (guided-diffusion EncoderUNet shape), loss
              `classifier_loss` (cross-entropy on z_t at random t)
  vit         the downstream ViT-S/16 at 224 px (`build_classifier`), cross-entropy (no augmentation)
  sampling    `guided_ddim_sample` with the paper UNet + latent classifier, guidance scale 10, eta 1
One training step = forward (under autocast for bf16; weights stay fp32) + backward + AdamW step
(config lr / weight decay; no gradient clipping, no EMA). Each row: one untimed warm-up step (it
also absorbs torch.compile's compilation), then --steps timed steps. Sampling: the warm-up is a
1-step chain, then one chain of --steps DDIM steps is timed and its per-step time is extrapolated
to images/s per full chain of sampling.num_inference_steps (50) steps.

Every row runs in a fresh subprocess. Peak memory: on CUDA torch.cuda.max_memory_allocated of that
process (weights + gradients + AdamW state + activations); on the CPU the process's peak resident
set size (ru_maxrss), which also counts Python + torch (the RSS after the imports is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PARAMS = ROOT / "params" / "nct_crc.yaml"

MODELS = ("ae", "unet", "classifier", "vit", "sampling")
LABELS = {"ae": "autoencoder", "unet": "unet", "classifier": "latent_classifier", "vit": "vit_s16",
          "sampling": "guided_ddim_s10"}
PRECISIONS = ("fp32", "bf16")
DEFAULT_BATCH = {"cpu": {"ae": 2, "unet": 2, "classifier": 2, "vit": 2, "sampling": 2},
                 "cuda": {"ae": 8, "unet": 16, "classifier": 64, "vit": 128, "sampling": 32}}
VIT_SIZE = 224


class OneLineParser(argparse.ArgumentParser):
    """Bad flags give one line on stderr (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    ap = OneLineParser(prog="bench_paper.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    ap.add_argument("--precision", nargs="+", default=list(PRECISIONS), help="fp32 and/or bf16 (default both)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), help=f"subset of {' '.join(MODELS)} (default all)")
    ap.add_argument("--batch", nargs="+", default=[], metavar="N|MODEL=N",
                    help="one batch size for every model, or MODEL=N per model "
                         f"(defaults: CPU {DEFAULT_BATCH['cpu']}; GPU {DEFAULT_BATCH['cuda']})")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row after one warm-up step (default 3)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the networks (Module.compile)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per row (0 = torch's default)")
    ap.add_argument("--row-timeout", type=float, default=900, help="seconds before a row is stopped (default 900)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec of one row, run in this process
    args = ap.parse_args(argv)
    if args.worker:
        return args

    if args.device != "auto" and args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda:") and not args.device[5:].isdigit():
        ap.error(f"--device {args.device!r}: expected cuda:N with an integer N")
    bad = [p for p in args.precision if p not in PRECISIONS]
    if bad:
        ap.error(f"--precision {bad[0]!r}: expected fp32 and/or bf16")
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"--models {bad[0]!r}: expected some of {', '.join(MODELS)}")
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    if args.threads < 0:
        ap.error(f"--threads {args.threads}: must be >= 0")
    if args.row_timeout <= 0:
        ap.error(f"--row-timeout {args.row_timeout}: must be > 0")
    args.batch_overrides = {}
    for item in args.batch:
        key, _, value = item.rpartition("=")
        if key and key not in MODELS:
            ap.error(f"--batch {item!r}: unknown model {key!r} (models: {', '.join(MODELS)})")
        if not value.isdigit() or int(value) < 1:
            ap.error(f"--batch {item!r}: the batch size must be an integer >= 1")
        for m in ([key] if key else MODELS):
            args.batch_overrides[m] = int(value)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            ap.error(f"--device {args.device}: CUDA is not available on this machine")
        if args.device[5:] and int(args.device[5:]) >= torch.cuda.device_count():
            ap.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    return args


# ---------------------------------------------------------------------------
# one row (runs in a fresh subprocess)
# ---------------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_row(spec: dict) -> dict:
    import torch

    rss_import = _rss_mb() if sys.platform.startswith("linux") else float("nan")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from hdlib.config import load_config
    from hdlib.evaluation.downstream import build_classifier
    from hdlib.models.builders import (
        autoencoder_downsampling,
        autoencoder_loss,
        build_autoencoder,
        build_latent_classifier,
        build_unet,
        count_parameters,
    )
    from hdlib.models.diffusion import (
        diffusion_loss,
        draw_noise_and_timesteps,
        make_noise_scheduler,
    )
    from hdlib.models.latent_classifier import classifier_loss
    from hdlib.sampling.samplers import guided_ddim_sample

    model, device, b, steps = spec["model"], spec["device"], spec["batch"], spec["steps"]
    dev_type = device.split(":")[0]
    is_cuda = dev_type == "cuda"
    if is_cuda:
        # set_device needs an index: plain "cuda" (the default) is device 0 (it raised on the first H200 run)
        torch.cuda.set_device(torch.device(device).index or 0)
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    cfg = load_config(PARAMS)
    S = cfg.data.image_size
    C, L = cfg.autoencoder.latent_channels, S // autoencoder_downsampling(cfg.autoencoder)
    K = len(cfg.data.classes)
    d = cfg.diffusion
    sched = make_noise_scheduler(d.schedule, d.num_train_timesteps, prediction_type=d.prediction_type)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def prep(m: torch.nn.Module, *compile_parts: torch.nn.Module) -> torch.nn.Module:
        m = m.to(device, memory_format=fmt)
        if spec["compile"]:
            for part in compile_parts or (m,):
                part.compile()  # in place: attributes (.config, .encode, .num_classes) stay reachable
        return m

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.to(device).contiguous(memory_format=fmt) if x.ndim == 4 else x.to(device)

    def per_sample_noise(step: int):
        noise, t = draw_noise_and_timesteps(torch.arange(b) + step * b, (C, L, L), d.num_train_timesteps)
        return put(noise), put(t)

    if model == "ae":
        a = cfg.autoencoder
        net = build_autoencoder(a)
        net = prep(net, net.encoder, net.decoder)  # autoencoder_loss calls .encode / .decode, not forward
        x = put(torch.rand(b, 3, S, S, generator=gen) * 2 - 1)
        train, params = a.train, count_parameters(net)

        def loss_fn(step):
            return autoencoder_loss(net, x, torch.arange(b) + step * b, a.kl_weight, a.ssim_weight)
    elif model == "unet":
        net = prep(build_unet(d, C, L))
        z0 = put(torch.randn(b, C, L, L, generator=gen))
        train, params = d.pretrain, count_parameters(net)

        def loss_fn(step):
            noise, t = per_sample_noise(step)
            return diffusion_loss(net, z0, noise, t, sched, loss_type=d.loss)
    elif model == "classifier":
        net = prep(build_latent_classifier(cfg.latent_classifier, C, L, K))
        z0 = put(torch.randn(b, C, L, L, generator=gen))
        y = put(torch.arange(b) % K)
        train, params = cfg.latent_classifier.train, count_parameters(net)

        def loss_fn(step):
            noise, t = per_sample_noise(step)
            return classifier_loss(net, z0, y, noise, t, sched)[0]
    elif model == "vit":
        net = prep(build_classifier(cfg.downstream.backbone, K))
        x = put(torch.rand(b, 3, VIT_SIZE, VIT_SIZE, generator=gen))
        y = put(torch.arange(b) % K)
        train, params = cfg.downstream.train, count_parameters(net)

        def loss_fn(step):
            return torch.nn.functional.cross_entropy(net(x), y)
    elif model == "sampling":
        unet = prep(build_unet(d, C, L).eval().requires_grad_(False))
        clf = prep(build_latent_classifier(cfg.latent_classifier, C, L, K).eval().requires_grad_(False))
        params = count_parameters(unet) + count_parameters(clf)
    else:
        raise ValueError(f"unknown model {model!r}")

    def autocast():  # a fresh context per use
        return torch.autocast(dev_type, dtype=torch.bfloat16) if spec["precision"] == "bf16" else nullcontext()

    if model == "sampling":
        def run(n_steps):
            with autocast():
                guided_ddim_sample(unet, sched, torch.arange(b) % K, torch.arange(b), classifier=clf,
                                   guidance_scale=10.0, num_inference_steps=n_steps, eta=cfg.sampling.eta,
                                   latent_shape=(C, L, L), batch_size=b, device=device, progress=False)
    else:
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        counter = iter(range(10**9))

        def run(n_steps):
            for _ in range(n_steps):
                with autocast():
                    loss = loss_fn(next(counter))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def timed(n_steps):
        if is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(n_steps)
        if is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warmup_s = timed(1)
    seconds = timed(steps)
    step_s = seconds / steps
    if model == "sampling":
        chain = cfg.sampling.num_inference_steps
        ips = b / (step_s * chain)
    else:
        chain, ips = None, b / step_s
    if is_cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"images_per_s": ips, "step_s": step_s, "warmup_s": warmup_s, "peak_mb": peak, "params": params,
            "rss_after_import_mb": rss_import, "chain_steps": chain, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def device_name(device: str, threads: int) -> str:
    import torch

    if device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(torch.device(device))}"
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {threads} thread{'s' if threads != 1 else ''} (of {os.cpu_count()} cores)"


def launch(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:g} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
    msg = lines[-1].strip() if lines else f"exit status {p.returncode}"
    if "out of memory" in msg.lower():
        msg = "out of memory"
    return {"error": msg[:120]}


def fmt_num(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_row(json.loads(args.worker))), flush=True)
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev_type = args.device.split(":")[0]
    batches = {m: args.batch_overrides.get(m, DEFAULT_BATCH[dev_type][m]) for m in MODELS}
    name = device_name(args.device, torch.get_num_threads())
    opts = [o for o, on in (("torch.compile", args.compile), ("channels_last", args.channels_last)) if on]
    print(f"paper sizes ({PARAMS.relative_to(ROOT)}); {name}; torch {torch.__version__}; "
          f"options: {', '.join(opts) or 'none'}; 1 warm-up + {args.steps} timed steps per row", flush=True)

    rows = []
    t_start = time.perf_counter()
    for m in args.models:
        for prec in args.precision:
            spec = {"model": m, "precision": prec, "batch": batches[m], "steps": args.steps, "device": args.device,
                    "compile": args.compile, "channels_last": args.channels_last, "threads": args.threads}
            t0 = time.perf_counter()
            r = launch(spec, args.row_timeout)
            r.update(model=m, precision=prec, batch=batches[m], wall_s=time.perf_counter() - t0)
            rows.append(r)
            status = r.get("error") or f"{fmt_num(r['images_per_s'])} images/s"
            print(f"  [{LABELS[m]} {prec} batch {batches[m]}: {status}; row took {r['wall_s']:.0f} s]",
                  file=sys.stderr, flush=True)

    header = ["model", "precision", "batch", "images/s", "s/step", "peak memory MB", "device"]
    table = []
    for r in rows:
        ok = "error" not in r
        table.append([LABELS[r["model"]] + (" *" if r["model"] == "sampling" else ""), r["precision"],
                      str(r["batch"]), fmt_num(r["images_per_s"]) if ok else r["error"],
                      f"{r['step_s']:.3g}" if ok else "-", f"{r['peak_mb']:.0f}" if ok else "-", args.device])
    print()
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 2 or i == len(header) - 1 else "---:" for i in range(len(header))) + "|")
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in table:
            print("  ".join(c.ljust(w) if i < 2 or i == len(row) - 1 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(row, widths))))
    print()
    ok = {(r["model"], r["precision"]): r for r in rows if "error" not in r}
    if any(r["model"] == "sampling" for r in ok.values()):
        chain = next(r["chain_steps"] for r in ok.values() if r["model"] == "sampling")
        print(f"* guided DDIM (scale 10, eta 1): images/s per full {chain}-step chain, EXTRAPOLATED from a timed "
              f"chain of {args.steps} step(s) (s/step = one UNet forward + one classifier forward/backward)")
    for m in args.models:
        if (m, "fp32") in ok and (m, "bf16") in ok:
            ratio = ok[(m, "bf16")]["images_per_s"] / ok[(m, "fp32")]["images_per_s"]
            print(f"bf16/fp32 speed ratio {LABELS[m]}: {ratio:.2f}x")
    params = {}
    for r in ok.values():
        params.setdefault(r["model"], r["params"])
    if params:
        print("parameters: " + ", ".join(f"{LABELS[m]} {params[m] / 1e6:.2f} M" for m in args.models if m in params)
              + (" (sampling = unet + latent_classifier)" if "sampling" in params else ""))
    if dev_type == "cpu":
        rss = [r["rss_after_import_mb"] for r in ok.values()]
        if rss:
            print(f"peak memory = peak RSS (ru_maxrss) of a fresh process per row; it includes the "
                  f"~{min(rss):.0f} MB RSS of Python + torch after the imports")
    else:
        print("peak memory = torch.cuda.max_memory_allocated of a fresh process per row")
    if args.compile and ok:
        print("warm-up (incl. compilation) s: " + ", ".join(
            f"{LABELS[m]} {p} {r['warmup_s']:.0f}" for (m, p), r in ok.items()))
    print(f"device: {name}; total {time.perf_counter() - t_start:.0f} s")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
