"""Beer-Lambert H&E stain model: named stain styles that render density maps to RGB."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class StainStyle:
    """Beer-Lambert H&E stain model: I = I0 * exp(-(C_H*od_h + C_E*od_e + C_N*od_n)).

    ``od_h`` / ``od_e`` are unit optical-density vectors (R, G, B) per unit
    concentration; the gains scale the drawn densities; ``background`` is I0;
    ``blur`` (in 224-px-tile pixels) mimics focus; ``noise`` is sensor noise in
    grey levels.
    """

    name: str
    od_h: tuple[float, float, float]
    od_e: tuple[float, float, float]
    h_gain: float = 1.0
    e_gain: float = 1.0
    background: tuple[float, float, float] = (244.0, 242.0, 245.0)
    blur: float = 0.6
    noise: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "od_h", tuple(float(x) for x in _unit(self.od_h)))
        object.__setattr__(self, "od_e", tuple(float(x) for x in _unit(self.od_e)))


STAIN_STYLES: dict[str, StainStyle] = {s.name: s for s in (
    # Ruifrok & Johnston's H&E vectors: purple-blue nuclei, pink eosin.
    StainStyle("classic", (0.65, 0.70, 0.29), (0.07, 0.99, 0.11), 1.0, 1.0, (244, 242, 245), 0.6, 2.0),
    # Under-stained, slightly out of focus.
    StainStyle("pale", (0.62, 0.70, 0.36), (0.10, 0.98, 0.18), 0.62, 0.6, (248, 246, 246), 1.2, 2.0),
    # Over-stained, crisp, darker slide background.
    StainStyle("dark", (0.55, 0.76, 0.34), (0.12, 0.97, 0.20), 1.35, 1.3, (234, 230, 238), 0.4, 3.0),
    # Held-out target: violet hematoxylin, magenta eosin (NCT-CRC-like after normalisation).
    StainStyle("target", (0.50, 0.72, 0.48), (0.22, 0.94, 0.26), 1.1, 0.9, (240, 236, 244), 0.7, 2.5),
    # Aged slide: yellowish background, orange-pink eosin, brownish hematoxylin.
    StainStyle("aged", (0.58, 0.68, 0.45), (0.04, 0.88, 0.47), 0.9, 1.1, (247, 240, 222), 0.9, 2.0),
)}

# Grey (neutral) density: out-of-focus glass, dirt; not a stain, so a flat OD.
_OD_NEUTRAL = _unit((1.0, 1.0, 1.0))


def apply_stain(h: np.ndarray, e: np.ndarray, style: StainStyle, rng: np.random.Generator | None = None,
                jitter: float = 0.0, neutral: np.ndarray | None = None) -> np.ndarray:
    """Render H/E (and optional neutral) density maps to uint8 RGB through ``style``.

    ``jitter`` in [0, 1] scales a random per-tile perturbation of the stain
    vectors, gains and background (needs ``rng``).
    """
    od_h = np.asarray(style.od_h)
    od_e = np.asarray(style.od_e)
    gh, ge = style.h_gain, style.e_gain
    bg = np.asarray(style.background, dtype=np.float64)
    if rng is not None and jitter > 0:
        od_h = _unit(np.clip(od_h + rng.normal(0, 0.06 * jitter, 3), 0.02, None))
        od_e = _unit(np.clip(od_e + rng.normal(0, 0.06 * jitter, 3), 0.02, None))
        gh *= float(np.exp(rng.normal(0, 0.3 * jitter)))
        ge *= float(np.exp(rng.normal(0, 0.3 * jitter)))
        bg = np.clip(bg + rng.normal(0, 5.0 * jitter, 3) - abs(rng.normal(0, 6.0 * jitter)), 180, 255)
    od = (h[..., None] * (gh * od_h) + e[..., None] * (ge * od_e)).astype(np.float32)
    if neutral is not None:
        od += neutral[..., None] * _OD_NEUTRAL.astype(np.float32)
    return (bg.astype(np.float32) * np.exp(-od)).astype(np.float32)
