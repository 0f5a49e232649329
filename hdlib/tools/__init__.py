"""The tools on top of the study: the papermill runner and its stage inputs, export / augment / sample,
the README block, the paper-layout dry run and the notebook builder."""
