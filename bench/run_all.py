"""Run every benchmark at its quick default settings (`make bench`).

bench_paper.py (every network at the paper sizes, fp32 and bf16) runs only where CUDA is
available: on a CPU it takes minutes per row; run it by hand there with small --batch/--steps
(bench/RESULTS.md has the command)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

runs = [("bench_training.py", []), ("bench_sampling.py", []), ("bench_resume.py", []), ("bench_downstream_cell.py", []),
        ("bench_pretrain_throughput.py", ["--steps", "2"]), ("bench_guided_sampling.py", ["--precisions", "fp32"])]
has_cuda = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                          check=False, capture_output=True).returncode == 0
if has_cuda:
    runs.append(("bench_paper.py", ["--markdown"]))

for script, args in runs:
    if (HERE / script).exists():
        print(f"\n=== {script} ===", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
if not has_cuda:
    print("\n=== bench_paper.py === skipped: no CUDA device (paper sizes; see bench/RESULTS.md)", flush=True)
