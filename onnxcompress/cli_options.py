"""The options several commands share, declared once: symbolic sizes and synthetic feeds,
recipes, gates, data and report files. Each decorator hands the command one argument
(``feed_options``, ``gates``) or the plain values."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import click

from onnxcompress.calibration import parse_dims
from onnxcompress.pipeline import Gates, Options

dim_option = click.option(
    "--dim",
    "dims",
    multiple=True,
    metavar="NAME=N|INPUT:AXIS=N",
    help="Size of a symbolic input dimension (repeatable).",
)


@dataclasses.dataclass(frozen=True)
class FeedOptions:
    """How feeds are built when a command needs them."""

    dims: dict[str, int]
    samples: int
    batch_size: int
    seed: int

    def pipeline_options(self, validate: bool, **more: Any) -> Options:
        return Options(self.dims, validate, self.samples, self.batch_size, seed=self.seed, **more)


def count_option(flag: str, default: int, minimum: int, text: str):
    """An integer option with a default and a floor (below it: a usage error)."""
    kind = click.IntRange(min=minimum)
    return click.option(flag, default=default, show_default=True, type=kind, help=text)


def data_options(command):
    """--dim, --samples, --batch-size, --seed: how feeds are built, shared by commands; the
    command receives them as one ``feed_options`` argument."""

    @functools.wraps(command)
    def wrapper(*args, dims, samples, batch_size, seed, **kwargs):
        feeds = FeedOptions(parse_dims(dims), samples, batch_size, seed)
        return command(*args, feed_options=feeds, **kwargs)

    options = [
        dim_option,
        count_option("--samples", 8, 1, "Synthetic feeds when no data is given."),
        count_option("--batch-size", 8, 1, "Batch for data on a dynamic batch axis."),
        count_option("--seed", 0, 0, "Seed for synthetic data."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def recipe_options(command):
    """-p/--pass and --recipe: which passes to run, shared by compress and batch."""
    command = click.option(
        "--recipe", "recipe_file", type=click.Path(), help="A TOML or JSON recipe."
    )(command)
    return click.option(
        "-p",
        "--pass",
        "passes",
        multiple=True,
        metavar="NAME[:KEY=VALUE,...]",
        help="A pass and its options, in order (repeatable).",
    )(command)


def gate_options(command):
    """--max-rel-error, --min-agreement, --gate-output: the user's tolerance, given to the
    command as one ``gates`` argument (None when no gate is set)."""

    @functools.wraps(command)
    def wrapper(*args, max_rel_error, min_agreement, gate_outputs, **kwargs):
        gates = None
        if max_rel_error is not None or min_agreement is not None:
            gates = Gates(max_rel_error, min_agreement, tuple(gate_outputs))
        return command(*args, gates=gates, **kwargs)

    options = [
        click.option(
            "--max-rel-error",
            type=float,
            help="Fail if any output's relative L2 error exceeds this.",
        ),
        click.option(
            "--min-agreement",
            type=float,
            help="Fail if any class-like output's top-1 agreement is below this.",
        ),
        click.option(
            "--gate-output",
            "gate_outputs",
            multiple=True,
            help="Apply the gates to this output only (repeatable).",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def data_and_report_options(data_help: str):
    """--calibration, --data (held-out feeds, ``data_help`` says for what), --report, --json."""

    def decorate(command):
        options = [
            click.option(
                "--calibration", type=click.Path(), help="A .npz or a folder of .npy feeds."
            ),
            click.option("--data", "validation_data", type=click.Path(), help=data_help),
            click.option(
                "--report", "report_path", type=click.Path(), help="Write the JSON report here."
            ),
            click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate
