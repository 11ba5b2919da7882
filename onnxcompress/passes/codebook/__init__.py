"""Weight sharing: codebooks plus bit-packed indices, decoded in the graph."""

from onnxcompress.passes.codebook.codebook import Codebook

__all__ = ["Codebook"]
