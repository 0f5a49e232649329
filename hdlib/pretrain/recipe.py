"""A pre-training run's recipe: what determines its weights and curves (a study folder holds one
run, so resuming it with another recipe is an error), and copies of a frozen config with one
setting changed (a run extended chunk by chunk, a sweep variant's length)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from ..config import Config
from ..errors import ConfigError
from ..io import atomic_write_json
from ..models.pretrained import file_hashes
from ..paths import StudyPaths

RUN_KEY = "pretrain_run_key"
COOLDOWN_CURVE = "pretrain_cooldown.csv"  # the judged rows of the run's cool-down branches (metrics/)


def branch_name(start: int, steps: int, variant: str | None = None) -> str:
    """The model folder of the run's cool-down branch from step `start` over `steps` (hdlib.pretrain.cooldown),
    or of its long variant `variant`'s."""
    return f"{variant_name(variant) if variant else 'denoiser_pretrained'}_cooldown_{start}_{steps}"


def branch_variant(row: dict) -> str:
    """The long variant a cool-down row branched from ('' for the trunk; rows written before the column had none)."""
    v = row.get("variant")
    return v if isinstance(v, str) else ""


def variant_name(variant: str) -> str:
    """The model folder of the run's long variant `variant` (hdlib.pretrain.variant)."""
    return f"denoiser_pretrained_variant_{variant}"


def config_with(cfg, dotted: str, value):
    """A copy of a frozen (nested) config with one setting changed, e.g.
    `config_with(cfg, "diffusion.pretrain.max_steps", 200)`; `cfg` itself is left as it is."""
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(cfg, **{head: config_with(getattr(cfg, head), rest, value) if rest else value})


def vae_sha256(path: str) -> str:
    """One sha256 over a diffusers folder's vae/ files (what autoencoder.init_from starts from)."""
    if not path:
        return ""
    lines = "".join(f"{v}  {k}\n" for k, v in file_hashes(path).items() if k.startswith("vae/"))
    return hashlib.sha256(lines.encode()).hexdigest()


def run_recipe_key(cfg: Config) -> dict:
    """What determines a pre-training run's weights and curves, except its lengths (constant lr after
    warm-up: a larger max_steps extends the same run) and settings that only say how it runs."""
    d = cfg.to_dict()
    d["data"].pop("shifted_test_path")  # a second test cohort: never seen by pre-training
    d["data"]["demo"].pop("shifted_test_style")
    ae, dm = d["autoencoder"], d["diffusion"]
    ae["train"].pop("max_steps")
    ae["train"].pop("checkpointing_steps")
    dm["pretrain"].pop("max_steps")
    dm["pretrain"].pop("checkpointing_steps")
    p = {k: d["pretrain"][k] for k in ("ae_eval_every", "eval_every", "eval_samples", "eval_inference_steps")}
    return {"seed": d["study"]["seed"], "data": d["data"], "autoencoder": ae, "diffusion": dm, "pretrain": p,
            "init_from_vae_sha256": vae_sha256(cfg.autoencoder.init_from),
            **({"pretrained_vae_sha256": vae_sha256(cfg.pretrained.path)} if cfg.pretrained.path else {})}


def check_run_recipe(cfg: Config) -> None:
    """A study folder holds one pre-training run. Resuming it with another recipe would mix its
    checkpoints and its quality curves with the new one's (and report them), so it is an error."""
    path = StudyPaths(cfg).metrics(RUN_KEY)
    key = json.loads(json.dumps(run_recipe_key(cfg)))
    if path.exists():
        old = json.loads(path.read_text())
        if old != key:
            diff = sorted(_key_diff(old, key))
            raise ConfigError(f"pretrain: {StudyPaths(cfg).root} holds a run of another recipe (differs in "
                              f"{', '.join(diff[:4])}); give this one its own study.name, or remove that folder")
        return
    atomic_write_json(path, key)


def _key_diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in _key_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]
