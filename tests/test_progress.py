"""Long steps report progress: one line per step, ``done/total`` last, an estimate of the
time left while steps remain."""

from __future__ import annotations

import re

import numpy as np
import pytest

from onnxcompress import compress
from onnxcompress.pipeline import Options
from onnxcompress.progress import Steps, tick
from tests.conftest import FIXTURES

LINE = re.compile(
    r"^(?P<label>.+) \[[#.]{30}\] (\((?P<note>[^)]*)\) )?(?P<done>\d+)/(?P<total>\d+)$"
)


def test_steps_count_up_with_an_estimate_until_the_last():
    lines: list[str] = []
    steps = Steps(lines.append, "work", 3)
    for _ in range(3):
        steps.done()
    parsed = [LINE.match(line) for line in lines]
    assert [(m["done"], m["total"]) for m in parsed] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert all(m["note"].endswith("s left") for m in parsed[:2])
    assert parsed[2]["note"] is None  # the finished line: the CLI ends it there


def test_tick_without_a_listener_is_silent():
    tick(None, "nothing", 1, 2)  # logs only


def _mlp_feeds(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input": rng.random((8, 784), np.float32)} for _ in range(count)]


@pytest.mark.parametrize(
    ("setting", "label"),
    [
        ("lowrank:max_error=0.2", "lowrank: layers"),
        ("codebook:bits=4", "codebook: weighing choices, probing gains"),
        ("codebook:bits=4", "codebook: fitting"),
    ],
)
def test_passes_report_each_layer(setting, label):
    lines: list[str] = []
    options = Options(validate=False, progress=lines.append)
    compress(str(FIXTURES / "mnist_mlp.onnx"), [setting], _mlp_feeds(), options=options)
    ours = [LINE.match(line) for line in lines if line.startswith(label)]
    assert ours, lines
    total = int(ours[0]["total"])
    done = [int(m["done"]) for m in ours]
    assert total >= 2 and done[done[0] == 0 :] == list(range(1, total + 1))


def test_lowrank_says_at_once_what_each_layer_does_and_then_how_long_is_left():
    lines: list[str] = []
    options = Options(validate=False, progress=lines.append)
    setting = "lowrank:max_error=0.2,min_speedup=0.01"
    compress(str(FIXTURES / "mnist_mlp.onnx"), [setting], _mlp_feeds(), options=options)
    ours = [LINE.match(line) for line in lines if line.startswith("lowrank: layers")]
    assert ours[0]["label"] == "lowrank: layers (capture, fit, timing)"
    assert ours[0]["done"] == "0" and ours[0]["note"] is None  # before the first layer
    assert ours[1]["note"].endswith("s left")
