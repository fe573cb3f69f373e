"""Plumbing without hcgen knowledge: atomic files, folder locks, hashing, text formats."""
