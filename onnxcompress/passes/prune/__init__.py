"""Structured filter pruning over channel-dependency groups."""

from onnxcompress.passes.prune.prune import Prune

__all__ = ["Prune"]
