"""The command line. Commands are thin: they parse options, call the public API, and turn our
errors into one clear line and an exit code (0 ok, 1 a gate missed or a batch member failed,
2 bad usage or bad input, 3 an internal error)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import traceback
from pathlib import Path

import click

from onnxcompress import model_io
from onnxcompress.batch import core as batch_core
from onnxcompress.batch import driver
from onnxcompress.batch import manifest as batch_manifest
from onnxcompress.calibration import (
    load_feeds,
    parse_dims,
    synthetic_feeds,
    with_default_batch,
)
from onnxcompress.cli_options import (
    count_option,
    data_and_report_options,
    data_options,
    dim_option,
    gate_options,
    recipe_options,
)
from onnxcompress.errors import OnnxCompressError, ToleranceExceeded
from onnxcompress.inspection import inspect_model
from onnxcompress.optimize import Metric, Target, Tolerance, optimize_file
from onnxcompress.passes import PASSES
from onnxcompress.pipeline import compress_file
from onnxcompress.recipe import Recipe
from onnxcompress.report import table, validation_dict, validation_table
from onnxcompress.validate import gate_failures, validate

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Fail(click.ClickException):
    """An error line with our exit code; click prints it without a traceback."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


def _handled(command):
    """Turn our exceptions into one line; --verbose also shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        verbose = click.get_current_context().find_root().params.get("verbose", False)
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except OnnxCompressError as exc:
            if verbose:
                traceback.print_exc()
            raise _Fail(str(exc), exc.exit_code) from None
        except Exception as exc:
            if verbose:
                traceback.print_exc()
            raise _Fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL) from None

    return wrapper


def _recipe(passes: tuple[str, ...], recipe_file: str | None) -> Recipe:
    if passes and recipe_file:
        raise click.UsageError("give either -p options or --recipe, not both")
    if recipe_file:
        return Recipe.from_file(recipe_file)
    if not passes:
        raise click.UsageError("no passes: give -p NAME:KEY=VALUE or --recipe FILE")
    return Recipe.from_options(passes)


@click.group()
@click.version_option(package_name="onnxcompress")
@click.option("-v", "--verbose", is_flag=True, help="Log progress and show tracebacks.")
def main(verbose: bool) -> None:
    """Compress ONNX models with graph-rewriting passes, validated in onnxruntime."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the result.")
@click.option("--in-place", is_flag=True, help="Replace MODEL itself (atomically).")
@recipe_options
@data_and_report_options("Validate on these feeds instead (default: the calibration data).")
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime comparison.")
@click.option("--keep-failed", is_flag=True, help="Write the output even when a gate fails.")
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Force weights into (or out of) a .data file; default: by size and input.",
)
@_handled
@gate_options
@data_options
def compress(
    model,
    output,
    in_place,
    passes,
    recipe_file,
    calibration,
    validation_data,
    report_path,
    as_json,
    no_validate,
    keep_failed,
    external_data,
    gates,
    feed_options,
) -> None:
    """Compress MODEL with the given passes and print the report."""
    target = _output_path(model, output, in_place)
    options = feed_options.pipeline_options(
        not no_validate, validation_data=validation_data, progress=_progress()
    )
    if gates and no_validate:
        raise click.UsageError("gates need validation; drop --no-validate")
    try:
        report = compress_file(
            model,
            target,
            _recipe(passes, recipe_file),
            calibration,
            gates,
            options,
            keep_failed=keep_failed,
            external_data=external_data,
            report_path=report_path,
        )
    except ToleranceExceeded as missed:
        _echo_report(missed.report, as_json)
        kept = f"; wrote {target} anyway (--keep-failed)" if keep_failed else "; nothing written"
        raise _Fail(f"gate missed: {missed}{kept}", EXIT_GATE) from None
    _echo_report(report, as_json)
    click.echo(f"wrote {target}", err=as_json)


@main.command("optimize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the result (its recipe and plot go beside it).",
)
@click.option("--target", required=True, help="size=RATIOx (size=8x) or bytes=N.")
@click.option(
    "--tolerance",
    multiple=True,
    help="agreement=A, rel=R (relative L2), metric=M or drop=D (with --metric); repeatable.",
)
@data_and_report_options("Held-out feeds to judge the candidates on (default: the calibration).")
@click.option("--no-explore", is_flag=True, help="Skip the sizes around the target.")
@click.option(
    "--metric",
    "metric_spec",
    metavar="FILE.py:FUNCTION",
    help="Your measure: FUNCTION(reference_outputs, candidate_outputs) -> score, 1 = same.",
)
@_handled
@data_options
def optimize_command(
    model,
    output,
    target,
    tolerance,
    calibration,
    validation_data,
    report_path,
    as_json,
    no_explore,
    metric_spec,
    feed_options,
) -> None:
    """Reach a size target under a tolerance: the best recipe found, and the trade-off."""
    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise click.UsageError("the output is the input file; give another -o")
    options = feed_options.pipeline_options(
        True, validation_data=validation_data, progress=_progress()
    )
    goal, limits = Target.parse(target), Tolerance.parse(tolerance)
    metric = Metric.from_spec(metric_spec) if metric_spec else None
    result, written, notes = optimize_file(
        model,
        output,
        goal,
        calibration,
        limits,
        options,
        explore=not no_explore,
        report_path=report_path,
        metric=metric,
    )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.to_text())
    for note in notes:
        click.echo(note, err=True)
    if result.chosen is None:
        raise _Fail(
            f"no recipe meets {result.target.words()} within the tolerance; nothing written",
            EXIT_GATE,
        )
    click.echo(f"wrote {written.model} and {written.recipe}", err=as_json)


def _output_path(model: Path, output: Path | None, in_place: bool) -> Path:
    if in_place:
        if output is not None:
            raise click.UsageError("give either -o or --in-place, not both")
        return model
    if output is None:
        raise click.UsageError("give an output file with -o (or --in-place)")
    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise click.UsageError("the output is the input file; use --in-place to replace it")
    return output


def _echo_report(report, as_json: bool) -> None:
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())


@main.command(name="inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@dim_option
@_handled
def inspect_command(model, as_json, dims) -> None:
    """Per-layer table of MODEL: op, weight shape, params, MACs, which passes apply."""
    result = inspect_model(model, parse_dims(dims))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.to_text())


@main.command(name="validate")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(), help="A .npz or a folder of .npy feeds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--latency-runs", default=20, show_default=True, help="Timed runs per model.")
@_handled
@gate_options
@data_options
def validate_command(
    reference,
    candidate,
    data,
    as_json,
    latency_runs,
    gates,
    feed_options,
) -> None:
    """Compare CANDIDATE with REFERENCE in onnxruntime: errors, agreement, latency."""
    from onnxcompress.normalize import check_opset, normalize

    ref_model = model_io.load(reference).model
    check_opset(model_io.load(candidate).model)  # a clear error for a bad candidate first
    normalize(ref_model)
    sizes = feed_options
    if data:
        feeds = load_feeds(data, ref_model, sizes.dims, sizes.batch_size)
    else:
        dims, _ = with_default_batch(ref_model, sizes.dims)
        feeds = synthetic_feeds(ref_model, dims, sizes.samples, sizes.seed)
    result = validate(reference, candidate, feeds, latency_runs=latency_runs)
    click.echo(
        json.dumps(validation_dict(result), indent=2)
        if as_json
        else "\n".join(validation_table(result))
    )
    failures = []
    if gates:
        failures = gate_failures(result, gates.max_rel_error, gates.min_agreement, gates.outputs)
    if failures:
        raise _Fail("gate missed: " + "; ".join(failures), EXIT_GATE)


@main.command()
def passes() -> None:
    """List every pass: its rewrite and its options with defaults."""
    for name, cls in PASSES.items():
        click.echo(f"{name}: {cls.summary()}")
        for f in dataclasses.fields(cls.Config):
            click.echo(f"    {f.name} = {f.default!r}")


@main.command()
@click.argument("inputs", nargs=-1)
@click.option(
    "-o",
    "--output-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for each model's output, its report and summary.json.",
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path),
    help="A JSONL or CSV file: per model its path and, optionally, recipe, dims, data.",
)
@recipe_options
@click.option(
    "--calibration",
    type=click.Path(),
    help="A .npz or a folder of .npy feeds, for every model the manifest gives none.",
)
@click.option(
    "--data",
    "validation_data",
    type=click.Path(),
    help="Validate on these feeds instead (default: the calibration data).",
)
@count_option("--jobs", 1, 1, "Models compressed in parallel (CPUs of a Ray started here).")
@click.option(
    "--executor",
    type=click.Choice(driver.EXECUTORS),
    default="local",
    show_default=True,
    help="Worker processes on this machine, or Ray tasks.",
)
@click.option("--address", help="A Ray cluster to join (auto, ray://HOST:PORT); --executor ray.")
@click.option("--force", is_flag=True, help="Convert again models an earlier run converted.")
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime comparison.")
@_handled
@gate_options
@data_options
def batch(
    inputs,
    output_dir,
    manifest,
    passes,
    recipe_file,
    calibration,
    validation_data,
    jobs,
    executor,
    address,
    force,
    no_validate,
    gates,
    feed_options,
) -> None:
    """Compress many models (files, folders, globs, a manifest) into OUTPUT_DIR; a model an
    earlier run converted with the same recipe and input is skipped. Exit 1 if any failed."""
    if address and executor != "ray":
        raise click.UsageError("--address needs --executor ray")
    if not inputs and manifest is None:
        raise click.UsageError("give models (files, folders, globs) or --manifest FILE")
    has_recipe = bool(passes or recipe_file)
    recipe = _recipe(passes, recipe_file) if has_recipe or inputs else Recipe()
    recipe.build()  # a recipe error stops the batch before any model
    options = feed_options.pipeline_options(not no_validate, validation_data=validation_data)
    job = batch_core.Job(recipe, calibration, gates, options)
    members = [batch_manifest.Member(model, job) for model in batch_core.collect_models(inputs)]
    if manifest is not None:
        members += batch_manifest.read(manifest, job, default_recipe=has_recipe)
    if not members:
        raise _Fail("no .onnx models found in the given inputs", EXIT_USAGE)
    try:
        tasks = driver.tasks(members, output_dir)  # hashes the calibration data: may take a while
    except KeyboardInterrupt:
        raise _Fail("interrupted before any model ran", driver.Interrupted.exit_code) from None
    results = driver.run(tasks, output_dir, executor, jobs, address, force, _progress())
    rows = [[r["model"], r["status"], r.get("detail", ""), r.get("ratio", "-")] for r in results]
    click.echo("\n".join(table(["model", "status", "detail", "params ratio"], rows, left=3)))
    counts = batch_core.summary(results)["counts"]
    click.echo(", ".join(f"{count} {status}" for status, count in counts.items() if count))
    failed = [r for r in results if r["status"] not in ("ok", "skipped (done)")]
    if failed:
        raise _Fail(f"{len(failed)} of {len(results)} models failed", EXIT_GATE)


def _progress():
    """A one-line progress bar on stderr (passes report long steps such as calibration),
    only when stderr is a terminal, so logs and pipes stay clean."""
    if not sys.stderr.isatty():
        return None

    def show(line: str) -> None:
        click.echo(f"\r{line}", nl=False, err=True)
        done, _, total = line.rpartition(" ")[2].partition("/")
        if done == total:  # the step finished: end the line
            click.echo("", err=True)

    return show


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="onnxcompress")
