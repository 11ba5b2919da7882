"""Pruning: structured (``prune``: whole filters over channel-dependency groups, consumers
repaired) and unstructured (``sparsity``: the smallest single weights, zeroed)."""

from onnxcompress.passes.prune.prune import Prune
from onnxcompress.passes.prune.sparsity import Sparsity

__all__ = ["Prune", "Sparsity"]
