"""How results are judged: downstream classifiers, FID/KID and classification metrics, paired
statistics, figures, and the pool's provenance-trained judge."""
