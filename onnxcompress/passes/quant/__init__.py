"""Quantization: int8 static Q/DQ insertion (``qdq``) and int4 weight-only (``int4``)."""

from onnxcompress.passes.quant.int4 import Int4
from onnxcompress.passes.quant.qdq import Qdq

__all__ = ["Int4", "Qdq"]
