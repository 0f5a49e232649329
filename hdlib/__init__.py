"""hdlib: HistoDiffusion reproduction -- models, sampler, filtering, data and metrics."""

__version__ = "0.1.0"

CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
