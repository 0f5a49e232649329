"""requirements.lock, requirements.txt and environment.yml agree on every pin, and the
installed packages are the builds requirements.txt pins."""

import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# conda provides setuptools itself, so environment.yml does not list it
NOT_IN_ENVIRONMENT_YML = {"setuptools"}


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(lines):
    """{normalised name: exact version, or None when not pinned with a single ==};
    a name listed twice is an error."""
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, spec = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?\s*(.*)", line).groups()
        assert _norm(name) not in out, f"{name} is listed twice"
        exact = re.fullmatch(r"==\s*([^=<>!~,;\s]+)", spec.strip())
        out[_norm(name)] = exact.group(1) if exact else None
    return out


def _lock():
    return _requirements((ROOT / "requirements.lock").read_text().splitlines())


def _direct():
    return _requirements((ROOT / "requirements.txt").read_text().splitlines())


def _environment_yml():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return _requirements(next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d))


def test_every_pin_is_exact():
    for what, reqs in (("requirements.lock", _lock()), ("environment.yml", _environment_yml())):
        loose = [name for name, version in reqs.items() if version is None]
        assert not loose, f"{what}: not pinned with ==: {loose}"


def test_requirements_txt_pins_agree_with_the_lock():
    lock, direct = _lock(), _direct()
    assert not set(direct) - set(lock), f"not pinned in requirements.lock: {sorted(set(direct) - set(lock))}"
    for name, version in direct.items():
        assert version is None or lock[name] == version, \
            f"requirements.txt pins {name}=={version}, requirements.lock has {lock[name]}"


def test_environment_yml_lists_the_direct_dependencies_at_the_locked_versions():
    lock, direct, env = _lock(), _direct(), _environment_yml()
    assert set(env) == set(direct) - NOT_IN_ENVIRONMENT_YML, \
        f"environment.yml and requirements.txt differ: {sorted(set(env) ^ (set(direct) - NOT_IN_ENVIRONMENT_YML))}"
    for name, version in env.items():
        assert lock[name] == version, f"environment.yml pins {name}=={version}, requirements.lock has {lock[name]}"


@pytest.mark.parametrize("name", [n for n, v in _direct().items() if v is not None])
def test_installed_version_is_the_pinned_one(name):
    """The packages requirements.txt pins itself (torch, torchvision) are installed at
    exactly those versions (a local build tag such as +cpu or +cu128 is allowed)."""
    installed = metadata.version(name).split("+")[0]
    assert installed == _direct()[name], f"{name} {installed} is installed, requirements.txt pins {_direct()[name]}"
