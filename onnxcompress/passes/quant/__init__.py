"""Quantization: int8 static Q/DQ insertion (``qdq``) and int4 weight-only (``int4``)."""
