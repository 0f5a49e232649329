"""Study services: what stages, training tasks and tools share. Each module holds one
service (the study context, split access, dataset preparation, the latent cache, the
trained models, generation, image classifiers and the filter, synthetic sets); none
imports a stage."""
