"""Run every benchmark at its quick default settings (`make bench`)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script, args in [("bench_training.py", []), ("bench_sampling.py", []), ("bench_resume.py", [])]:
    if (HERE / script).exists():
        print(f"\n=== {script} ===", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
