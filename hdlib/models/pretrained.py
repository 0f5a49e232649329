"""Pre-trained models in diffusers format: load, check, export.

A pre-trained folder (e.g. the shipped `models/demo-pool/`, a user's own
histology LDM, or a Stable Diffusion VAE copied to disk) holds

    vae/        AutoencoderKL (config.json + diffusion_pytorch_model.safetensors);
                its config's `scaling_factor` is the latent scale (1/std of pool latents)
    unet/       UNet2DModel, unconditional (optional: without it the study trains its own
                denoiser on the pool latents of this VAE)
    scheduler/  the forward-process schedule the unet was trained with (DDPMScheduler config)
    MANIFEST.sha256   sha256 of every file (written by `export_pretrained`)

Weights from outside are read as safetensors only (`use_safetensors=True`): nothing
is unpickled. Any number of latent channels and any downsampling factor works; a
mismatch between vae, unet and the study's image size is a one-line ConfigError
before any compute.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_dir

MANIFEST = "MANIFEST.sha256"


def _folder(path: str | Path, sub: str | None = None) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"pretrained.path: {p}: not a folder")
    if sub is None:
        return p
    q = p / sub
    if not (q / "config.json").exists() and not (q / "scheduler_config.json").exists():
        raise ConfigError(f"pretrained.path: {q}: no diffusers {sub}/ folder (config.json missing)")
    if sub in ("vae", "unet") and not list(q.glob("*.safetensors")):
        raise ConfigError(f"pretrained.path: {q}: no .safetensors weights (pickled weights are never loaded)")
    return q


def has_unet(path: str | Path) -> bool:
    return (Path(path) / "unet" / "config.json").exists()


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def vae_downsampling(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_compatible(path: str | Path, image_size: int) -> dict:
    """Shapes of a pre-trained folder, checked against each other and the study's image size.
    Returns {"latent_channels", "downsampling", "latent_size", "has_unet"}."""
    vc = _config(_folder(path, "vae"))
    down = vae_downsampling(vc)
    C = int(vc["latent_channels"])
    if image_size % down:
        raise ConfigError(f"pretrained.path: {path}: data.image_size {image_size} is not divisible by the "
                          f"autoencoder's downsampling factor {down}")
    size = image_size // down
    info = {"latent_channels": C, "downsampling": down, "latent_size": size, "has_unet": has_unet(path)}
    if info["has_unet"]:
        uc = _config(_folder(path, "unet"))
        if int(uc["in_channels"]) != C or int(uc["out_channels"]) != C:
            raise ConfigError(f"pretrained.path: {path}: unet has {uc['in_channels']} input / {uc['out_channels']} "
                              f"output channels but the vae's latents have {C}")
        us = uc.get("sample_size")
        us = us[0] if isinstance(us, (list, tuple)) else us
        if us is not None and int(us) != size:
            raise ConfigError(f"pretrained.path: {path}: unet sample_size {us} does not match the latent size "
                              f"{size} (data.image_size {image_size} / downsampling {down})")
        if uc.get("num_class_embeds"):
            raise ConfigError(f"pretrained.path: {path}: unet is class-conditional; an unconditional "
                              "UNet2DModel is needed")
        _folder(path, "scheduler")
    return info


def load_vae(path: str | Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(_folder(path, "vae")), use_safetensors=True).float()


def vae_like(path: str | Path):
    """A freshly initialised AutoencoderKL with the folder's vae architecture (weights not read)."""
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in _config(_folder(path, "vae")).items() if not k.startswith("_")}
    return AutoencoderKL.from_config(cfg)


def check_init_vae(path: str | Path, image_size: int) -> None:
    """autoencoder.init_from: a diffusers vae/ with safetensors weights whose downsampling divides the image size."""
    try:
        down = vae_downsampling(_config(_folder(path, "vae")))
    except ConfigError as e:
        raise ConfigError(str(e).replace("pretrained.path", "autoencoder.init_from", 1)) from None
    if image_size % down:
        raise ConfigError(f"autoencoder.init_from: {path}: data.image_size {image_size} is not divisible by the "
                          f"autoencoder's downsampling factor {down}")


def load_unet(path: str | Path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(str(_folder(path, "unet")), use_safetensors=True).float()


def unet_like(path: str | Path, num_classes: int | None = None):
    """A freshly initialised UNet2DModel with the pre-trained unet's architecture
    (class-conditional with `num_classes` + 1 embeddings when asked)."""
    from diffusers import UNet2DModel

    cfg = {k: v for k, v in _config(_folder(path, "unet")).items() if not k.startswith("_")}
    cfg["num_class_embeds"] = (num_classes + 1) if num_classes is not None else None
    return UNet2DModel.from_config(cfg)


def load_scheduler(path: str | Path):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(str(_folder(path, "scheduler")))


def read_latent_info(path: str | Path) -> dict:
    """{"scaling_factor": ...} from the vae config (diffusers' own key)."""
    vc = _config(_folder(path, "vae"))
    if "scaling_factor" not in vc:
        raise ConfigError(f"pretrained.path: {path}/vae/config.json has no scaling_factor")
    return {"scaling_factor": float(vc["scaling_factor"])}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(path: str | Path) -> dict[str, str]:
    """sha256 of every file under the folder (but the manifest), by relative path."""
    root = Path(path)
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def model_files_hashes(path: str | Path) -> dict[str, str]:
    """sha256 of the files that define the model (vae/, unet/, scheduler/)."""
    return {k: v for k, v in file_hashes(path).items() if k.split("/")[0] in ("vae", "unet", "scheduler")}


def folder_sha256(path: str | Path) -> str:
    """One sha256 over the model files' hashes: the content key of a pre-trained model."""
    lines = "".join(f"{v}  {k}\n" for k, v in model_files_hashes(path).items())
    return hashlib.sha256(lines.encode()).hexdigest()


def verify(path: str | Path, expected_sha256: str = "") -> str:
    """Check the folder against its MANIFEST.sha256 (if any) and `expected_sha256`
    (if given); returns the folder's sha256. A mismatch names the first bad file."""
    root = _folder(path)
    manifest = root / MANIFEST
    if manifest.exists():
        want = {}
        for line in manifest.read_text().splitlines():
            if line.strip():
                digest, name = line.split(None, 1)
                want[name.strip()] = digest
        have = file_hashes(root)
        for name, digest in want.items():
            if have.get(name) != digest:
                raise ConfigError(f"pretrained.path: {root / name}: "
                                  f"{'missing' if name not in have else 'sha256 differs from ' + MANIFEST}")
    got = folder_sha256(root)
    if expected_sha256 and got != expected_sha256:
        raise ConfigError(f"pretrained.sha256: {root} has sha256 {got}, expected {expected_sha256}")
    return got


# How a denoiser was trained, beyond the forward process its scheduler/ holds: what fine-tuning it
# (an adaptation) must keep, or it trains the model toward another objective.
OBJECTIVE_KEYS = ("loss", "snr_gamma", "timestep_sampling", "lognormal_mean", "lognormal_std")


def training_objective(path: str | Path) -> dict:
    """The denoiser's training objective as its folder's card.json records it ({} when it records none:
    a folder made elsewhere). lognormal_mean/std only count for log-normal noise levels."""
    card = _folder(path) / "card.json"
    d = (json.loads(card.read_text()).get("denoiser") or {}) if card.exists() else {}
    got = {k: d[k] for k in OBJECTIVE_KEYS if k in d}
    if got.get("timestep_sampling") != "lognormal":
        got = {k: v for k, v in got.items() if not k.startswith("lognormal_")}
    return got


def check_objective(path: str | Path, diffusion, label: str = "diffusion") -> None:
    """A study that fine-tunes the pre-trained denoiser must train it with the objective it was trained with:
    one line naming the first setting that differs and the value to set."""
    for key, want in training_objective(path).items():
        have = getattr(diffusion, key)
        if (have != want) if isinstance(want, str) else abs(float(have) - float(want)) > 1e-9:
            raise ConfigError(f"{label}.{key}: {have!r}, but {path}'s denoiser was trained with {want!r} (its card.json); "
                              f"an adaptation fine-tunes it, so set {label}.{key}: {want}")


def _drop_load_path(config: Path) -> None:
    """A model loaded with from_pretrained saves where it was loaded from (`_name_or_path`, a path on this
    machine): not part of the model, and it would change the folder's pin."""
    import json

    if config.exists():
        d = json.loads(config.read_text())
        if d.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")  # diffusers' own layout


def export_pretrained(out: str | Path, vae, unet=None, scheduler=None, scaling_factor: float | None = None,
                      extra_files: dict[str, str] | None = None, half: bool = False) -> Path:
    """Write vae/ (with its scaling_factor), unet/, scheduler/ and MANIFEST.sha256 to `out`,
    atomically (a temporary folder renamed into place). `half` stores fp16 weights."""
    with atomic_dir(out) as tmp:
        _write_model_folder(tmp, vae, unet, scheduler, scaling_factor, extra_files, half)
    return Path(out)


def _write_model_folder(tmp: Path, vae, unet, scheduler, scaling_factor, extra_files, half) -> None:
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(scaling_factor))
    if half:
        vae, unet = vae.half(), (unet.half() if unet is not None else None)
    vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
    if unet is not None:
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    if scheduler is not None:
        scheduler.save_pretrained(str(tmp / "scheduler"))
    for sub in ("vae", "unet"):
        _drop_load_path(tmp / sub / "config.json")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    (tmp / MANIFEST).write_text("".join(f"{v}  {k}\n" for k, v in file_hashes(tmp).items()))
