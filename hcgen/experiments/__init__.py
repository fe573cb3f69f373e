"""Experiments of the paper built on the stage graph."""
