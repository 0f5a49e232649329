"""hdlib, the tests and the notebook sources pass pyflakes' checks (ruff F: undefined and unused
names, redefinitions): notebook code is linted like the rest."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pyflakes_rules_pass():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    out = subprocess.run([ruff, "check", "--select", "F", "--output-format", "concise", "hdlib", "tests",
                          "notebooks/src"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
