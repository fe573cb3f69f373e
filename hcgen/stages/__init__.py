"""A graph of resumable stages keyed by their inputs, its estimates, and a Dask runner."""
