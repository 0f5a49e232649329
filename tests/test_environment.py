"""The pins in requirements.lock, requirements.txt and environment.yml agree."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[_norm(name)] = ver.strip()
    return out


def test_environment_yml_matches_lock():
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    direct = [_norm(re.split(r"[=<>\s]", l.strip())[0]) for l in (ROOT / "requirements.txt").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_pins = _pins(pip_section)
    assert set(direct) <= set(lock), f"not pinned in requirements.lock: {set(direct) - set(lock)}"
    missing = [d for d in direct if d not in env_pins and d != "setuptools"]
    assert not missing, f"in requirements.txt but not environment.yml: {missing}"
    for name, ver in env_pins.items():
        assert lock.get(name) == ver, f"environment.yml pins {name}=={ver}, requirements.lock has {lock.get(name)}"


def test_torch_pins_exact():
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    assert lock["torch"] == "2.14.1" and lock["torchvision"] == "0.29.1"
    txt = (ROOT / "requirements.txt").read_text()
    assert "torch==2.14.1" in txt and "torchvision==0.29.1" in txt
