"""Nested dicts of numpy arrays / torch tensors with array-like indexing."""

from gdict.gdict import GDict

__all__ = ["GDict"]
