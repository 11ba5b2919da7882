"""Run a recipe: normalize, upgrade the opset if a pass needs it, run each pass and check the
graph after it, validate against the original in onnxruntime, gate, report."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxcompress import guards, model_io
from onnxcompress.blas import limited_blas
from onnxcompress.calibration import (
    Feed,
    check_finite,
    known_input_shapes,
    load_feeds,
    synthetic_feeds,
    with_default_batch,
    zeros_feed,
)
from onnxcompress.errors import BadModel, BadOption, CannotRun, PassBrokeGraph, ToleranceExceeded
from onnxcompress.graph import (
    Shapes,
    default_opset,
    infer_shapes,
    mac_operands,
    model_macs,
    stripped_proto,
    weight_params,
)
from onnxcompress.normalize import normalize
from onnxcompress.passes.base import CompressionPass, PassContext
from onnxcompress.recipe import Recipe
from onnxcompress.report import CompressionReport, ModelStats
from onnxcompress.runner import Runner, observe_shapes
from onnxcompress.validate import compare, gate_failures

logger = logging.getLogger(__name__)

RECIPE_METADATA_KEY = "onnxcompress.recipe"


@dataclass(frozen=True)
class Gates:
    """The user's tolerance: a result missing any gate is refused."""

    max_rel_error: float | None = None
    min_agreement: float | None = None
    outputs: tuple[str, ...] = ()  # restrict gates to these outputs (all when empty)

    def __post_init__(self) -> None:
        """A threshold that no figure can be compared with would switch the gate off."""
        error, agreement = self.max_rel_error, self.min_agreement
        if error is not None and not (math.isfinite(error) and error >= 0):
            raise BadOption(f"max_rel_error={error}: must be a finite number >= 0")
        if agreement is not None and not 0 <= agreement <= 1:
            raise BadOption(f"min_agreement={agreement}: must be in [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        gates = {"max_rel_error": self.max_rel_error, "min_agreement": self.min_agreement}
        if self.outputs:
            gates["outputs"] = list(self.outputs)
        return {k: v for k, v in gates.items() if v is not None}


@dataclass(frozen=True)
class Options:
    """How to run a recipe besides the recipe itself."""

    dims: Mapping[str, int] | None = None
    validate: bool = True
    samples: int = 8  # synthetic feeds when no data is given
    batch_size: int = 8
    max_feeds: int | None = 64  # at most this many calibration batches are used
    latency_runs: int = 20
    seed: int = 0
    validation_data: str | Path | Sequence[Feed] | None = None  # default: the calibration
    progress: Callable[[str], None] | None = None


def compress(
    model: model_io.ModelLike,
    recipe: Recipe | Sequence[str],
    calibration: str | Path | Sequence[Feed] | None = None,
    tolerance: Gates | None = None,
    options: Options | None = None,
) -> tuple[Any, CompressionReport]:
    """Compress ``model`` with ``recipe``; return the result (same kind as given) and a report.

    Raises ToleranceExceeded (with ``.model`` and ``.report``) when a gate is missed.
    """
    loaded = model_io.load(model)
    result, report = run_recipe(loaded, recipe, calibration, tolerance, options or Options())
    return model_io.convert_back(result, loaded.kind), report


def run_recipe(
    loaded: model_io.Loaded,
    recipe: Recipe | Sequence[str],
    calibration: str | Path | Sequence[Feed] | None,
    tolerance: Gates | None,
    options: Options,
) -> tuple[ir.Model, CompressionReport]:
    with limited_blas():  # small matrices between onnxruntime runs: see blas.py
        return _run_recipe(loaded, recipe, calibration, tolerance, options)


def _run_recipe(loaded, recipe, calibration, tolerance, options):
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_options(list(recipe))
    passes = recipe.build()  # every recipe error surfaces before any work
    model = loaded.model
    notes = [*loaded.notes, *normalize(model)]
    if calibration is None:  # synthetic feeds and accounting need a batch size: 1 by default
        dims, batch_notes = with_default_batch(model, options.dims or {})
        options, notes = dataclasses.replace(options, dims=dims), [*notes, *batch_notes]
    feeds = resolve_feeds(calibration, model, options)
    input_shapes = (
        {name: list(array.shape) for name, array in feeds[0].items()}
        if feeds
        else known_input_shapes(model, options.dims or {})
    )
    reference = _reference_runner(model, options, notes)
    try:
        baseline = _checks_that_hold(model, reference is not None)
        if reference is not None:  # its session opens again when a pass or validation runs it
            reference.release()
        model = _upgrade_opset(model, passes, notes)
        shapes = resolve_shapes(model, input_shapes)  # the first pass's too: nothing changed
        report = CompressionReport(
            before=_stats(model, shapes, loaded.path),
            normalization=notes,
            input_shapes=input_shapes,
            source=str(loaded.path) if loaded.path else None,
        )
        ctx = PassContext(
            dims=dict(options.dims or {}),
            calibration=feeds,
            synthetic_calibration=calibration is None,
            teacher=reference,
            seed=options.seed,
            progress=options.progress,
        )
        for compression_pass in passes:
            ctx.shapes = shapes or resolve_shapes(model, input_shapes)
            shapes = None  # later passes see the model the one before left
            report.passes.append(_run_pass(compression_pass, model, ctx, baseline))
        model.metadata_props[RECIPE_METADATA_KEY] = json.dumps(recipe.to_dict())
        report.after = _stats(model, resolve_shapes(model, input_shapes), None)
        if options.validate and reference is not None:
            held_out = options.validation_data
            checks = feeds if held_out is None else resolve_feeds(held_out, model, options)
            _validate(report, reference, model, checks, tolerance, options)
    finally:
        if reference is not None:
            reference.close()
    report.gate_failures += [miss for p in report.passes for miss in p.missed]
    if report.gate_failures:
        raise ToleranceExceeded("; ".join(report.gate_failures), report, model)
    return model, report


def resolve_feeds(calibration, model: ir.Model, options: Options) -> Sequence[Feed]:
    """The feeds ``calibration`` names for ``model`` (a file or folder read as ``options``
    say, feeds as given, or synthetic feeds when None and validating)."""
    if calibration is None:
        if not options.validate:
            return []
        return synthetic_feeds(model, options.dims or {}, options.samples, options.seed)
    if isinstance(calibration, (str, Path)):
        return load_feeds(calibration, model, options.dims, options.batch_size, options.max_feeds)
    feeds = list(calibration)
    check_finite(feeds)
    return feeds


def _reference_runner(model: ir.Model, options: Options, notes: list[str]) -> Runner | None:
    """A session on the original model, built before any pass touches it."""
    try:
        return Runner(model, "original model")
    except CannotRun as exc:
        if options.validate:
            raise CannotRun(f"{exc}; pass --no-validate to compress without validation") from None
        notes.append(f"not validated: {exc}")
        return None


def _checks_that_hold(model: ir.Model, runs_in_onnxruntime: bool) -> list[str]:
    """The checks the original passes; each pass must keep passing them."""
    return [name for name in ("checker", "shapes") if _check(name, model) is None] + (
        ["onnxruntime"] if runs_in_onnxruntime else []
    )


def _check(name: str, model: ir.Model) -> str | None:
    """Run one check; return its failure message, or None when it passes."""
    try:
        if name == "onnxruntime":
            Runner(model, "rewritten model").close()
            return None
        with stripped_proto(model) as proto:
            if name == "checker":
                onnx.checker.check_model(proto, full_check=True)
            else:
                onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:
        return str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    return None


def _upgrade_opset(model: ir.Model, passes: list[CompressionPass], notes: list[str]) -> ir.Model:
    """Convert to the newest opset a pass asks for (old models only); note it."""
    needs = {p.name: p.required_opset(model) for p in passes}
    needs = {name: opset for name, opset in needs.items() if opset}
    if not needs:
        return model
    target = max(needs.values())
    current = default_opset(model)
    folders = model_io.external_folders(model)
    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), target)
    except Exception as exc:
        raise BadModel(f"cannot upgrade opset {current} to {target}: {exc}") from None
    notes.append(f"upgraded opset {current} -> {target} (needed by {', '.join(sorted(needs))})")
    _keep_value_info_of(model, proto)
    upgraded = ir.from_proto(proto)
    upgraded.functions.update(model.functions)  # the converter drops model-local functions
    if len(folders) > 1:
        raise BadModel("external data in several folders cannot survive an opset upgrade")
    if folders:  # the rebuilt model must still find its data where the original did
        model_io.keep_external_folder(upgraded, folders.pop())
    return upgraded


def _keep_value_info_of(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Drop the shapes the version converter inferred for intermediate tensors: with them,
    onnxruntime fuses ops the original never fused (Add + LayerNormalization into a
    SkipLayerNormalization 8x slower on this CPU), so the upgrade alone cost 1.1-1.2x."""
    typed = {v.name for node in model.graph for v in node.outputs if v is not None and v.type}
    kept = [info for info in proto.graph.value_info if info.name in typed]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)


def resolve_shapes(model: ir.Model, input_shapes: dict[str, list[int]]) -> Shapes:
    """Inferred shapes, completed by one onnxruntime run on zeros where inference gives up."""
    shapes = infer_shapes(model, input_shapes)
    unknown = [n for n in mac_operands(model) if None in shapes.get(n, (None,))]
    feed = zeros_feed(model, input_shapes)
    if unknown and feed:
        shapes.update(observe_shapes(model, feed, unknown))
    return shapes


def _run_pass(compression_pass, model, ctx, baseline):
    logger.info("running pass %s", compression_pass.name)
    report = compression_pass.run(model, ctx)
    RemoveUnusedNodesPass()(model)
    for name in baseline:
        failure = _check(name, model)
        if failure:
            raise PassBrokeGraph(f"pass {compression_pass.name} broke the {name} check: {failure}")
    return report


def _stats(model: ir.Model, shapes: Shapes, path: Path | None) -> ModelStats:
    params, nbytes = weight_params(model)
    macs = model_macs(model, shapes)
    file_bytes = model_io.size_on_disk(path) if path else None
    return ModelStats(params, nbytes, macs, file_bytes)


def _validate(report, reference, model, feeds, tolerance, options) -> None:
    candidate = Runner(model, "compressed model")
    try:
        report.validation = compare(reference, candidate, feeds, latency_runs=options.latency_runs)
    finally:
        candidate.close()
    if tolerance:
        report.gates = tolerance.as_dict()
        report.gate_failures = gate_failures(
            report.validation, tolerance.max_rel_error, tolerance.min_agreement, tolerance.outputs
        )


def compress_file(
    source: str | Path,
    output: str | Path,
    recipe: Recipe | Sequence[str],
    calibration: str | Path | None = None,
    tolerance: Gates | None = None,
    options: Options | None = None,
    *,
    keep_failed: bool = False,
    external_data: bool | None = None,
    report_path: str | Path | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> CompressionReport:
    """Compress a file into another (or the same, atomically); write the JSON report if asked.

    On a missed gate nothing is written unless ``keep_failed``; ToleranceExceeded is raised
    either way, after the report file is written. ``provenance`` goes into the report as it is
    (batch stores the input's hashes and the recipe fingerprint there to resume).
    """
    loaded = model_io.load(source)
    if external_data is None:  # keep the input's form (or take the data file a large one needs)
        external_data = model_io.wants_external_data(loaded.model)
    _check_output_paths(loaded, output, report_path, external_data)
    try:
        model, report = run_recipe(loaded, recipe, calibration, tolerance, options or Options())
    except ToleranceExceeded as missed:
        missed.report.provenance = dict(provenance or {})
        if keep_failed:
            _save_with_sizes(missed.model, output, missed.report, external_data)
        if report_path:
            write_json(report_path, missed.report.to_dict())
        raise
    report.provenance = dict(provenance or {})
    _save_with_sizes(model, output, report, external_data)
    if report_path:
        write_json(report_path, report.to_dict())
    return report


def _check_output_paths(loaded, output, report_path, external_data: bool) -> None:
    """Before any work: every file this run writes can be written and overwrites no input
    (an in-place run replaces only its own model) and no other output of the run."""
    target = model_io.write_target(output)
    outputs = [("output", target)]
    if external_data:
        outputs.append(("output's external data", model_io.data_file(target)))
    if report_path:
        outputs.append(("report", Path(report_path)))
    inputs = model_io.input_files(loaded)
    in_place = bool(inputs) and Path(os.path.realpath(target)) == inputs[0]
    guards.refuse_overwrites(outputs, inputs, replaceable=tuple(inputs) if in_place else ())
    for what, path in outputs:
        guards.check_writable(path, what)


def _save_with_sizes(model, output, report: CompressionReport, external_data) -> None:
    model_io.save(model, output, external_data=external_data)
    report.output = str(output)
    if report.after is not None:
        report.after.file_bytes = model_io.size_on_disk(output)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file beside it, then rename)."""
    model_io.write_text_atomically(Path(path), json.dumps(data, indent=2) + "\n")
