"""Study parameters: defaults <- YAML <- key=value, with one-line errors naming file and key."""

from pathlib import Path

import pytest

from hdlib.config import load_config
from hdlib.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["smoke", "default", "nct_crc"])
def test_shipped_params_load(name):
    cfg = load_config(ROOT / "params" / f"{name}.yaml")
    assert cfg.study.name == name
    assert cfg.results_dir == Path("results") / name


def test_nct_crc_builds_the_papers_autoencoder():
    """The paper's autoencoder, built from params/nct_crc.yaml, takes a 256 px tile to a 3 x 64 x 64
    latent (f = 4) and back."""
    import torch

    from hdlib.models.builders import build_autoencoder

    cfg = load_config(ROOT / "params" / "nct_crc.yaml")
    vae = build_autoencoder(cfg.autoencoder).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size)).latent_dist.mean
        assert tuple(z.shape) == (1, 3, 64, 64)
        assert tuple(vae.decode(z).sample.shape) == (1, 3, 256, 256)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "params/smoke.yaml", ["data.image_size=48", "downstream.seeds=[3,4]",
                                                   "study.progress=true", "filtering.tau=0.9"])
    assert cfg.data.image_size == 48 and cfg.downstream.seeds == [3, 4]
    assert cfg.study.progress is True and cfg.filtering.tau == 0.9


def test_exponent_without_dot_is_a_number(tmp_path):
    """YAML 1.1 reads `4e-4` as a string; a float key takes it as the number it means."""
    p = _write(tmp_path, "diffusion:\n  pretrain:\n    lr: 4e-4\n")
    assert load_config(p).diffusion.pretrain.lr == 4e-4
    assert load_config(ROOT / "params/smoke.yaml", ["diffusion.adapt.lr=2e-4"]).diffusion.adapt.lr == 2e-4
    with pytest.raises(ConfigError, match="diffusion.pretrain.lr"):
        load_config(_write(tmp_path, "diffusion:\n  pretrain:\n    lr: 4e-4x\n"))


def _write(tmp_path, text):
    p = tmp_path / "study.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,key", [
    ("data:\n  imagesize: 64\n", "data.imagesize"),
    ("dat:\n  image_size: 64\n", "dat"),
    ("data:\n  image_size: big\n", "data.image_size"),
    ("data:\n  image_size: 8\n", "data.image_size"),
    ("sampling:\n  eta: 1.5\n", "sampling.eta"),
    ("study:\n  mixed_precision: fp8\n", "study.mixed_precision"),
    ("diffusion:\n  pretrain:\n    lr: -1\n", "diffusion.pretrain.lr"),
    ("data:\n  pool_sources:\n    - {name: a, kind: tape}\n", "data.pool_sources[0].kind"),
    ("study:\n  seed: 1.5\n", "study.seed"),
    ("study:\n  progress: 1\n", "study.progress"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and key in msg
    assert "\n" not in msg


def test_unknown_override_key(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'diffusion\.nope=1'.*diffusion\.nope: unknown key"):
        load_config(ROOT / "params/smoke.yaml", ["diffusion.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(ROOT / "params/smoke.yaml", ["diffusion.schedule"])


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="downstream.fractions: 0.3 is not in data.label_fractions"):
        load_config(ROOT / "params/smoke.yaml", ["downstream.fractions=[0.3]"])
    with pytest.raises(ConfigError, match="target style may not be in the pool"):
        load_config(ROOT / "params/smoke.yaml",
                    ["data.pool_sources=[{name: t, kind: demo_procedural, style: target}]"])
    with pytest.raises(ConfigError, match="data.train_path: required"):
        load_config(ROOT / "params/smoke.yaml", ["data.target=class_folders"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: [unclosed\n"))


def test_section_hash_tracks_only_its_sections():
    a = load_config(ROOT / "params/smoke.yaml")
    b = load_config(ROOT / "params/smoke.yaml", ["downstream.seeds=[7]"])
    assert a.section_hash("autoencoder") == b.section_hash("autoencoder")
    assert a.section_hash("downstream") != b.section_hash("downstream")


def test_cli_bad_params_one_line_exit_2(capsys):
    """A real process exits 2 with one `error:` line (nothing else on stderr, e.g. from imports); a second
    mistake is checked in-process (each `python -m hdlib` start imports the stack, ~11 s here)."""
    import subprocess
    import sys

    from hdlib.__main__ import main

    proc = subprocess.run([sys.executable, "-m", "hdlib", "config", str(ROOT / "params/smoke.yaml"), "data.image_size=3"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert main(["train", "autoencoder", str(ROOT / "params/missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.yaml" in err, err


def test_string_override_keeps_the_text_yaml_would_read_as_bool_or_number():
    cfg = load_config(None, ["study.mixed_precision=no", "study.name=2024"])
    assert cfg.study.mixed_precision == "no" and cfg.study.name == "2024"
    assert load_config(None, ["study.progress=no"]).study.progress is False  # a bool field still gets a bool


def test_sampler_comparison_entries_are_checked_when_loading():
    from hdlib.config import parse_samplers

    assert parse_samplers(["ddim:25", "dpm_solver:10"]) == [("ddim", 25), ("dpm_solver", 10)]
    for bad in ("ddim", "euler:10", "ddim:0", "ddim:x"):
        with pytest.raises(ConfigError, match=f"bad entry '{bad}'"):
            load_config(ROOT / "params" / "smoke.yaml", [f"sampling.sampler_comparison=['{bad}']"])
