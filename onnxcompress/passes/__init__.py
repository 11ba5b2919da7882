"""Every compression pass, by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from onnxcompress.errors import RecipeError
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
)
from onnxcompress.passes.codebook import Codebook
from onnxcompress.passes.lowrank import LowRank
from onnxcompress.passes.prune import Prune, Sparsity
from onnxcompress.passes.quant import Int4, Qdq

PASSES: dict[str, type[CompressionPass]] = {
    cls.name: cls for cls in (LowRank, Prune, Sparsity, Codebook, Qdq, Int4)
}


def pass_for(name: str, options: Mapping[str, Any]) -> tuple[type[CompressionPass], dict]:
    """The pass class a recipe step names and the options to build it with, older spellings
    resolved: ``prune:mode=sparsity`` is the sparsity pass (where ``repair=auto`` means none),
    ``prune:mode=filters`` plain prune. Recipes stored before the split keep working."""
    options = dict(options)
    if name == "prune" and "mode" in options:
        name = _prune_mode(options)
    cls = PASSES.get(name)
    if cls is None:
        raise RecipeError(f"unknown pass {name!r} (known: {', '.join(sorted(PASSES))})")
    return cls, options


def _prune_mode(options: dict[str, Any]) -> str:
    """The pass ``prune:mode=...`` means; ``options`` is adjusted in place."""
    mode = str(options.pop("mode")).strip()
    if mode == "filters":
        return "prune"
    if mode != "sparsity":
        raise RecipeError(f"prune: mode={mode!r}: must be filters or sparsity")
    sparsity = {f.name for f in dataclasses.fields(Sparsity.Config)}
    filters_only = {f.name for f in dataclasses.fields(Prune.Config)} - sparsity
    for key in options:
        if key in filters_only:
            raise RecipeError(f"prune:mode=sparsity: option {key!r} is for filter pruning only")
    repair = str(options.get("repair", "none")).strip()
    if repair == "auto":
        options["repair"] = "none"
    elif repair == "bias":
        raise RecipeError("prune:mode=sparsity: repair='bias' is for filter pruning only")
    return Sparsity.name


__all__ = [
    "PASSES",
    "Codebook",
    "CompressionPass",
    "Int4",
    "LayerReport",
    "LowRank",
    "PassContext",
    "PassReport",
    "Prune",
    "Qdq",
    "Skip",
    "Sparsity",
    "pass_for",
]
