"""Weight files of trained modules: diffusers `save_pretrained` folders or model.safetensors,
and the weights of a finished training run (`out_dir/final/`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import HDLibError


def save_weights(module: nn.Module, directory: str | Path) -> None:
    """`save_pretrained` where the module has one (diffusers models), else model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(str(directory), safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(module, str(directory / "model.safetensors"))


def load_weights(module: nn.Module, directory: str | Path) -> nn.Module:
    """Load weights written by `save_weights` into `module` (strict)."""
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        load_model(module, str(directory / "model.safetensors"), strict=True)
        return module
    files = sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        raise HDLibError(f"{directory}: expected one *.safetensors weights file, found {len(files)}")
    try:
        module.load_state_dict(load_file(str(files[0])), strict=True)
    except RuntimeError as e:
        raise HDLibError(f"{files[0]}: weights do not fit {type(module).__name__} "
                         f"({str(e).splitlines()[0]})") from None
    return module


def load_final(model_factory_or_model, out_dir: str | Path, ema: bool = True, module: str = "model") -> nn.Module:
    """The trained weights of a finished run in `out_dir`, loaded into the given model
    (or one made by calling the factory). ema=True gives the EMA weights where the run
    kept an EMA (the weights to sample with), else the raw weights. `module` names an
    extra module of the run instead of the model."""
    final = Path(out_dir) / "final"
    if not (final / "COMPLETE").exists():
        raise HDLibError(f"{final}: no finished training run here (train it first)")
    model = model_factory_or_model if isinstance(model_factory_or_model, nn.Module) else model_factory_or_model()
    if module == "model":
        sub = final / "ema" if ema and (final / "ema").is_dir() else final / "model"
    else:
        sub = final / module
        if not sub.is_dir():
            raise HDLibError(f"{final}: the run has no module named {module!r}")
    return load_weights(model, sub)
