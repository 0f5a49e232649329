"""Generation with class control: the one guided pipeline (pipeline), the sampler functions on it
(samplers), the selective filter (filtering) and quota filling (quota)."""
