"""Memory does not grow with the data: peak RSS of stage 00 + stage 01's latent encoding
at N and at 4N images.

    python bench/bench_memory.py [--n 5000] [--root DIR] [--image-size 64] [--max-ratio 1.2]

1. Builds (once; reused when DIR already holds a build with the same settings) a class-folder
   dataset in the NCT-CRC-HE layout under DIR/n<N>/: 9 class folders (ADI BACK DEB LYM MUC MUS
   NORM STR TUM) of 224x224 .tif tiles for train (4N in total, classes balanced), a small test
   set (--test-per-class per class) and an unlabeled pool folder of 4N 224 px .tif tiles, all
   rendered by `hdlib.demo.render_tile` (train/test in the "target" stain, the pool in
   classic/pale/dark). The N-sized copy holds hard links to the first N train / pool tiles (same
   pixels, same test set), so only 4N + 4N + test tiles are ever rendered.
2. For each size, in a FRESH process (so its peak RSS is that run's alone): loads a config
   (target=class_folders, a folder pool source, data.pool_size = every pool tile not held out,
   data.num_workers=0, progress off), runs `prepare_data(cfg)`, saves a randomly initialised
   autoencoder of the study's default size (`build_autoencoder(cfg.autoencoder)`, nothing is
   trained) with `export_pretrained` and points `pretrained.path` at it, then runs
   `encode_latents(cfg)` (every split, streamed into float16 memory maps).
3. Prints each run's time per part, RSS after each part and peak RSS (`ru_maxrss`, and
   /proc's VmHWM on Linux), the ratio of the peaks (4N / N) and PASS/FAIL against
   --max-ratio; exits 1 on FAIL.

The parent process imports neither numpy nor torch: on Linux a child's ru_maxrss starts at
the peak of the process it was exec'd from, so the parent stays small (the dataset is built
in a subprocess as well). `--tracemalloc` additionally lists, after each part, the Python
allocation sites holding the most memory (slow; for finding what grows).

Run it with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 for one thread; the children inherit them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
POOL_STYLES = ("classic", "pale", "dark")
TARGET_STYLE = "target"
TILE = 224
BUILD_VERSION = 1
SPLIT_IDS = {"train": 0, "test": 1, "pool": 2}


# --------------------------------------------------------------------------- helpers
def maxrss_mb() -> float:
    """Peak RSS of this process (ru_maxrss: KB on Linux, bytes on macOS), in MB."""
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / 2**20 if sys.platform == "darwin" else v / 2**10


def proc_status_mb() -> dict:
    """VmRSS / RssAnon / RssFile / VmHWM of this process in MB (Linux; {} elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(rest.split()[0]) / 2**10
    except OSError:
        pass
    return out


def per_class(total: int) -> list[int]:
    return [total // len(CLASSES) + (k < total % len(CLASSES)) for k in range(len(CLASSES))]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def threads() -> str:
    return os.environ.get("OMP_NUM_THREADS", "default")


# --------------------------------------------------------------------------- dataset
def layout(n: int, test_per_class: int) -> dict:
    return {"version": BUILD_VERSION, "n": n, "tile": TILE, "test_per_class": test_per_class,
            "train_per_class": per_class(n), "pool": n}


def size_dir(root: Path, n: int, factor: int, which: str) -> Path:
    return root / f"n{n}" / ("x1" if which == "x1" else f"x{factor}")


def built(d: Path, want: dict) -> bool:
    try:
        return json.loads((d / "built.json").read_text()) == want
    except (OSError, ValueError):
        return False


def build_data(root: Path, n: int, factor: int, test_per_class: int, compression: str | None) -> None:
    """Render the factor*N dataset (resumable: finished files are kept), then hard-link the
    N-sized one into place. Runs in its own process (see the module doc)."""
    import numpy as np
    import tifffile
    from tqdm import tqdm

    sys.path.insert(0, str(ROOT))
    from hdlib.demo import render_tile

    big, small = size_dir(root, n, factor, "big"), size_dir(root, n, factor, "x1")
    want_big, want_small = layout(factor * n, test_per_class), layout(n, test_per_class)
    jobs = []  # (path, split, class id, index, style)
    for split, counts in (("train", per_class(factor * n)), ("test", [test_per_class] * len(CLASSES))):
        for k, (cls, m) in enumerate(zip(CLASSES, counts)):
            jobs += [(big / split / cls / f"{cls}-{i:06d}.tif", split, k, i, TARGET_STYLE) for i in range(m)]
    jobs += [(big / "pool" / f"tile-{i:06d}.tif", "pool", -1, i, POOL_STYLES[i % len(POOL_STYLES)])
             for i in range(factor * n)]
    if not built(big, want_big):
        todo = [j for j in jobs if not j[0].exists()]
        print(f"rendering {len(todo)} of {len(jobs)} {TILE} px tiles into {big}", flush=True)
        for path, split, k, i, style in tqdm(todo, desc=f"render {factor}N", unit="tile", mininterval=2.0):
            rng = np.random.default_rng([0, SPLIT_IDS[split], max(k, 0), i])
            cls = CLASSES[k] if k >= 0 else CLASSES[int(rng.integers(len(CLASSES)))]
            pixels = render_tile(cls, TILE, rng, style=style)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tifffile.imwrite(tmp, pixels, photometric="rgb", compression=compression)
            os.replace(tmp, path)
        (big / "built.json").write_text(json.dumps(want_big))
    if not built(small, want_small):
        shutil.rmtree(small, ignore_errors=True)
        links = []
        for split, counts in (("train", per_class(n)), ("test", [test_per_class] * len(CLASSES))):
            for cls, m in zip(CLASSES, counts):
                links += [Path(split) / cls / f"{cls}-{i:06d}.tif" for i in range(m)]
        links += [Path("pool") / f"tile-{i:06d}.tif" for i in range(n)]
        for rel in tqdm(links, desc="link N", unit="file", mininterval=2.0):
            (small / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(big / rel, small / rel)
            except OSError:
                shutil.copy2(big / rel, small / rel)
        (small / "built.json").write_text(json.dumps(want_small))


# --------------------------------------------------------------------------- one measured run
def measured_run(a) -> None:
    """One size, in this (fresh) process: prepare_data, save an untrained autoencoder,
    encode_latents; RSS after each part; the result as JSON in a.out."""
    t_start = time.perf_counter()
    steps = []

    def mark(name, t0):
        steps.append({"step": name, "seconds": time.perf_counter() - t0, "maxrss_mb": maxrss_mb(),
                      **proc_status_mb()})
        print(f"  [{a.label}] {name}: {steps[-1]['seconds']:.1f} s, RSS {steps[-1].get('VmRSS', float('nan')):.0f} MB,"
              f" peak {steps[-1]['maxrss_mb']:.0f} MB", file=sys.stderr, flush=True)
        if a.tracemalloc:
            import tracemalloc

            cur, peak = tracemalloc.get_traced_memory()
            print(f"    tracemalloc: {cur / 2**20:.1f} MB live, {peak / 2**20:.1f} MB peak; largest live sites:",
                  file=sys.stderr)
            for st in tracemalloc.take_snapshot().statistics("lineno")[:8]:
                print(f"      {st.size / 2**20:8.2f} MB {st.count:8d} blocks  {st.traceback[0]}", file=sys.stderr)
            tracemalloc.reset_peak()

    steps.append({"step": "start", "seconds": 0.0, "maxrss_mb": maxrss_mb(), **proc_status_mb()})
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import torch

    from hdlib.config import load_config
    from hdlib.models.builders import build_autoencoder
    from hdlib.models.pretrained import export_pretrained
    from hdlib.study.latents import encode_latents
    from hdlib.study.preparation import prepare_data
    mark("imports", t0)
    if a.tracemalloc:
        import tracemalloc

        tracemalloc.start()

    data, work = Path(a.data), Path(a.work)
    pretrained = work / "pretrained"
    cfg = load_config(None, [
        "data.target=class_folders", f"data.train_path={data / 'train'}", f"data.test_path={data / 'test'}",
        f"data.image_size={a.image_size}", f"data.pool_size={a.pool_size}", "data.num_workers=0",
        f"data.pool_sources=[{{name: pool, kind: folder, path: {data / 'pool'}}}]",
        f"study.results_root={work / 'results'}", f"study.data_root={work / 'data'}", f"study.name={a.label}",
        "study.progress=false", f"study.device={a.device}", f"pretrained.path={pretrained}", *a.set])

    t0 = time.perf_counter()
    summary = prepare_data(cfg)
    mark("prepare_data", t0)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    export_pretrained(pretrained, build_autoencoder(cfg.autoencoder))  # untrained: memory does not depend on weights
    mark("save autoencoder", t0)

    t0 = time.perf_counter()
    meta = encode_latents(cfg)
    mark("encode_latents", t0)

    result = {"label": a.label, "steps": steps, "total_seconds": time.perf_counter() - t_start,
              "maxrss_mb": maxrss_mb(), "VmHWM": proc_status_mb().get("VmHWM"),
              "counts": meta["counts"], "latent_shape": meta["shape"],
              "n_train_images": sum(summary["counts"]["train"].values()) + sum(summary["counts"]["val"].values()),
              "n_test_images": sum(summary["counts"]["test"].values()),
              "autoencoder": list(cfg.autoencoder.block_out_channels), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads()}
    Path(a.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver
def run_child(args_list: list[str]) -> int:
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args_list], check=False).returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="train images (and pool tiles) of the small size")
    p.add_argument("--factor", type=int, default=4, help="the large size is factor * N")
    p.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "hdlib_bench_memory"),
                   help="scratch folder (datasets are kept and reused; study outputs are rewritten)")
    p.add_argument("--image-size", type=int, default=64, help="data.image_size (tiles are resized from 224)")
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--compression", default="none", choices=("none", "zlib", "lzw"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-ratio", type=float, default=1.2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for both runs (e.g. data.label_fractions=[0.5,1.0] for a tiny --n)")
    p.add_argument("--tracemalloc", action="store_true", help="list the largest live Python allocation sites per part")
    p.add_argument("--_build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    p.add_argument("--pool-size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    root = Path(a.root).resolve()
    compression = None if a.compression == "none" else a.compression

    if a._build:
        build_data(root, a.n, a.factor, a.test_per_class, compression)
        return 0
    if a._run:
        measured_run(a)
        return 0

    if a.n < 100 or a.factor < 2:
        p.error("--n must be >= 100 and --factor >= 2")
    free_gb = shutil.disk_usage(root.parent if not root.exists() else root).free / 2**30
    print(f"scratch {root} ({free_gb:.0f} GB free); {a.n} and {a.factor * a.n} images", flush=True)
    t0 = time.perf_counter()
    base = ["--n", str(a.n), "--factor", str(a.factor), "--root", str(root), "--test-per-class", str(a.test_per_class),
            "--compression", a.compression]
    if run_child([*base, "--_build"]):
        print("dataset build failed", file=sys.stderr)
        return 2
    build_s = time.perf_counter() - t0

    pool_holdout = 16  # the config default: min(16, pool // 5) tiles per source are held out
    results = []
    for which, n in (("x1", a.n), ("big", a.factor * a.n)):
        label = f"n{n}"
        data = size_dir(root, a.n, a.factor, which)
        work = root / f"n{a.n}" / "runs"
        shutil.rmtree(work / "results" / label, ignore_errors=True)  # a fresh study each time
        out = work / f"{label}.json"
        out.unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        print(f"measuring N={n} in a fresh process", flush=True)
        rc = run_child([*base, "--_run", "--label", label, "--data", str(data), "--work", str(work),
                        "--pool-size", str(n - min(pool_holdout, max(1, n // 5))), "--image-size", str(a.image_size),
                        "--device", a.device, "--out", str(out), *[f"--set={kv}" for kv in a.set]]
                       + (["--tracemalloc"] if a.tracemalloc else []))
        if rc:
            print(f"measured run N={n} failed (exit {rc})", file=sys.stderr)
            return 2
        results.append(json.loads(out.read_text()))

    small, large = results
    ratio = large["maxrss_mb"] / small["maxrss_mb"]
    ok = ratio <= a.max_ratio
    print()
    print("memory benchmark: stage 00 prepare_data + stage 01 encode_latents, one fresh process per size")
    print(f"machine: {cpu_name()}, {threads()} thread(s) (OMP_NUM_THREADS; torch uses {small['torch_threads']}), "
          f"device {a.device}; torch {small['torch']}; {sys.platform}")
    print(f"data: NCT-CRC layout, {TILE} px .tif (compression {a.compression}), 9 classes, test "
          f"{a.test_per_class}/class; image_size {a.image_size}; data.num_workers 0; untrained autoencoder "
          f"{small['autoencoder']} (latents {small['latent_shape']} float16)")
    print(f"dataset build: {build_s:.0f} s (0 when reused)" + (f"; config overrides {a.set}" if a.set else ""))
    print()
    print("| run | train+val | test | pool | imports s | prepare_data s | save AE s | encode_latents s | total s "
          "| RSS after imports MB | peak RSS MB (ru_maxrss) | VmHWM MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = {st["step"]: st for st in r["steps"]}
        c = r["counts"]
        print(f"| N={r['label'][1:]} | {c['target_train'] + c['target_val']} | {c['target_test']} | {c['pool']} "
              f"| {s['imports']['seconds']:.1f} | {s['prepare_data']['seconds']:.1f} "
              f"| {s['save autoencoder']['seconds']:.1f} | {s['encode_latents']['seconds']:.1f} "
              f"| {r['total_seconds']:.1f} | {s['imports']['VmRSS']:.0f} | {r['maxrss_mb']:.0f} "
              f"| {r['VmHWM'] or float('nan'):.0f} |")
    print()
    print("RSS after each part (MB): current VmRSS = RssAnon + RssFile (+ RssShmem) / peak so far")
    for r in results:
        parts = ", ".join(f"{st['step']} {st.get('VmRSS', float('nan')):.0f} = {st.get('RssAnon', float('nan')):.0f}"
                          f" + {st.get('RssFile', float('nan')):.0f} / {st['maxrss_mb']:.0f}"
                          for st in r["steps"][1:])
        print(f"  N={r['label'][1:]}: {parts}")
    print()
    print(f"peak RSS: N={small['label'][1:]} {small['maxrss_mb']:.0f} MB, N={large['label'][1:]} "
          f"{large['maxrss_mb']:.0f} MB")
    print(f"ratio {a.factor}N / N = {ratio:.3f} (limit {a.max_ratio}): {'PASS' if ok else 'FAIL'}")
    print(f"(this driver process: peak RSS {maxrss_mb():.0f} MB; wall {time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
