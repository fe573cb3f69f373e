"""Pipelines built on the numeric core: generation, training, evaluation, the Table 1 protocol."""
