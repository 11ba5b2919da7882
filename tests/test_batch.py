"""batch on the local executor: resume (a model done with the same recipe and input is skipped,
a change of either converts it again, --force redoes all, a failure is retried), manifests
(JSONL and CSV, per-model recipe and dims, bad lines named), Ctrl-C (exit 130, nothing
half-written), and the one line when Ray is asked for but not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress.batch import core, driver
from tests.conftest import FIXTURES
from tests.passes.lowrank.test_lowrank import matmul_model
from tests.test_cli import assert_one_clear_line, invoke

LOWRANK = ["-p", "lowrank:rank=2"]


def _models(folder, count=3, shape=(3, 64)):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        onnx.save(matmul_model(list(shape), k=64, n=64 + i), folder / f"m{i}.onnx")
    return folder


def _statuses(out):
    summary = json.loads((out / "summary.json").read_text())
    return {os.path.basename(m["model"]): m["status"] for m in summary["models"]}


def _stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}


def test_a_second_run_skips_every_done_model(tmp_path):
    models, out = _models(tmp_path / "models"), tmp_path / "out"
    assert invoke("batch", models, "-o", out, *LOWRANK).exit_code == 0
    before = _stamps(out)
    report = json.loads((out / "m0.report.json").read_text())
    assert set(report["provenance"]) == {"input_sha256", "recipe_fingerprint"}
    assert report["provenance"]["input_sha256"] == {"m0.onnx": core.file_sha256(models / "m0.onnx")}
    again = invoke("batch", models, "-o", out, *LOWRANK)
    assert again.exit_code == 0, again.output
    assert set(_statuses(out).values()) == {"skipped (done)"}
    assert _stamps(out) == before  # nothing written again
    assert json.loads((out / "summary.json").read_text())["counts"]["skipped (done)"] == 3
    assert "3 skipped (done)" in again.stdout


def test_a_changed_recipe_input_or_force_converts_again(tmp_path):
    models, out = _models(tmp_path / "models"), tmp_path / "out"
    assert invoke("batch", models, "-o", out, *LOWRANK).exit_code == 0
    # the same recipe written another way is the same recipe
    assert invoke("batch", models, "-o", out, "-p", "lowrank:rank=2,energy=none").exit_code == 0
    assert set(_statuses(out).values()) == {"skipped (done)"}
    assert invoke("batch", models, "-o", out, "-p", "lowrank:rank=3").exit_code == 0
    assert set(_statuses(out).values()) == {"ok"}
    onnx.save(matmul_model([3, 64], k=64, n=70), models / "m1.onnx")  # other bytes, same name
    assert invoke("batch", models, "-o", out, "-p", "lowrank:rank=3").exit_code == 0
    assert _statuses(out) == {
        "m0.onnx": "skipped (done)",
        "m1.onnx": "ok",
        "m2.onnx": "skipped (done)",
    }
    assert invoke("batch", models, "-o", out, "-p", "lowrank:rank=3", "--dim", "N=1").exit_code == 0
    assert set(_statuses(out).values()) == {"ok"}  # other options: another fingerprint
    assert (
        invoke(
            "batch", models, "-o", out, "-p", "lowrank:rank=3", "--dim", "N=1", "--force"
        ).exit_code
        == 0
    )
    assert set(_statuses(out).values()) == {"ok"}


def test_a_failed_or_damaged_model_is_converted_again(tmp_path):
    models, out = _models(tmp_path / "models", count=2), tmp_path / "out"
    (models / "bad.onnx").write_bytes(b"\x08\x07garbage" * 20)
    assert invoke("batch", models, "-o", out, *LOWRANK).exit_code == 1
    assert _statuses(out)["bad.onnx"] == "failed"
    onnx.save(matmul_model([3, 64], k=64, n=64), models / "bad.onnx")  # the user fixes it
    (out / "m1.onnx").write_bytes(b"not what we wrote")  # an output changed behind our back
    result = invoke("batch", models, "-o", out, *LOWRANK)
    assert result.exit_code == 0, result.output
    assert _statuses(out) == {"bad.onnx": "ok", "m0.onnx": "skipped (done)", "m1.onnx": "ok"}


def test_a_missed_gate_is_not_done(tmp_path):
    models, out = _models(tmp_path / "models", count=1), tmp_path / "out"
    gate = ["--max-rel-error", "0.001"]
    assert invoke("batch", models, "-o", out, *LOWRANK, *gate).exit_code == 1
    assert invoke("batch", models, "-o", out, *LOWRANK, *gate).exit_code == 1
    assert _statuses(out) == {"m0.onnx": "gate missed"}


def test_manifest_jsonl_gives_each_model_its_recipe_dims_and_output(tmp_path):
    models = tmp_path / "lists" / "models"
    models.mkdir(parents=True)
    onnx.save(matmul_model([3, 64], k=64, n=64), models / "a.onnx")
    onnx.save(matmul_model(["N", "T", 64], k=64, n=64), models / "b.onnx")
    (tmp_path / "lists" / "codebook.toml").write_text('[[passes]]\nname = "codebook"\nbits = 4\n')
    lines = [
        {"path": "models/a.onnx"},  # the command line's recipe
        {
            "path": "models/b.onnx",
            "recipe": "lowrank:rank=3",
            "dims": {"T": 5},
            "output": "bee.onnx",
        },
        {"path": "models/a.onnx", "recipe": "codebook.toml", "output": "a-codebook.onnx"},
    ]
    manifest = tmp_path / "lists" / "models.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    out = tmp_path / "out"
    result = invoke("batch", "--manifest", manifest, "-o", out, *LOWRANK)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.onnx")) == ["a-codebook.onnx", "a.onnx", "bee.onnx"]
    a, bee, cb = (
        json.loads((out / f"{n}.report.json").read_text()) for n in ("a", "bee", "a-codebook")
    )
    assert a["passes"][0]["config"]["rank"] == 2
    assert bee["passes"][0]["config"]["rank"] == 3 and bee["input_shapes"] == {"X": [1, 5, 64]}
    assert cb["passes"][0]["name"] == "codebook"


def test_manifest_csv_and_inputs_together(tmp_path):
    _models(tmp_path / "models", count=2)
    manifest = tmp_path / "models.csv"
    manifest.write_text("path,recipe,dims\nmodels/m0.onnx,lowrank:rank=4,\nmodels/m1.onnx,,N=1\n")
    out = tmp_path / "out"
    extra = _models(tmp_path / "extra", count=1)
    result = invoke("batch", extra / "m0.onnx", "--manifest", manifest, "-o", out, *LOWRANK)
    assert result.exit_code == 0, result.output
    ranks = {
        p.name: json.loads(p.read_text())["passes"][0]["config"]["rank"]
        for p in out.glob("*.report.json")
    }
    assert ranks == {"m0.report.json": 2, "m0-1.report.json": 4, "m1.report.json": 2}


@pytest.mark.parametrize(
    ("text", "suffix", "fragments"),
    [
        (
            '{"path": "a.onnx"}\n{"path": "b.onnx", "recipe": "lowrank:rnak=2"}\n',
            ".jsonl",
            ["line 2", "rnak"],
        ),
        ('{"path": "a.onnx"}\n\n[1, 2]\n', ".jsonl", ["line 3", "not a JSON object"]),
        ('{"path": "a.onnx", "colour": "red"}\n', ".jsonl", ["line 1", "unknown field 'colour'"]),
        ('{"recipe": "lowrank"}\n', ".jsonl", ["line 1", "no 'path'"]),
        ('{"path": "a.onnx", "dims": "T=x"}\n', ".jsonl", ["line 1", "bad --dim"]),
        (
            '{"path": "a.onnx", "output": "../up.onnx"}\n',
            ".jsonl",
            ["line 1", "'output' must be a file name"],
        ),
        (
            '{"path": "a.onnx", "output": "x.onnx"}\n{"path": "b.onnx", "output": "x.onnx"}\n',
            ".jsonl",
            ["line 2", "line 1's"],
        ),
        (
            "path,recipe\na.onnx,lowrank:rank=2\nb.onnx,nosuchpass\n",
            ".csv",
            ["line 3", "nosuchpass"],
        ),
        ("model,recipe\na.onnx,lowrank\n", ".csv", ["line 1", "unknown column 'model'"]),
        ("path,recipe\na.onnx,lowrank,extra\n", ".csv", ["line 2", "more cells than columns"]),
    ],
)
def test_a_bad_manifest_line_stops_the_batch_before_any_model(tmp_path, text, suffix, fragments):
    _models(tmp_path, count=1)
    (tmp_path / "m0.onnx").rename(tmp_path / "a.onnx")
    manifest = tmp_path / f"models{suffix}"
    manifest.write_text(text)
    out = tmp_path / "out"
    result = invoke("batch", "--manifest", manifest, "-o", out, *LOWRANK)
    assert_one_clear_line(result, 2, str(manifest), *fragments)
    assert not out.exists()


def test_a_manifest_line_without_a_recipe_needs_one_from_the_command_line(tmp_path):
    _models(tmp_path, count=1)
    manifest = tmp_path / "models.jsonl"
    manifest.write_text('{"path": "m0.onnx", "recipe": "lowrank:rank=2"}\n{"path": "m0.onnx"}\n')
    result = invoke("batch", "--manifest", manifest, "-o", tmp_path / "out")
    assert_one_clear_line(result, 2, "line 2", "no recipe")


def test_ray_not_installed_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    models, out = _models(tmp_path / "models", count=1), tmp_path / "out"
    result = invoke("batch", models, "-o", out, *LOWRANK, "--executor", "ray")
    assert_one_clear_line(result, 2, "ray is not installed: pip install 'onnxcompress[ray]'")
    assert not out.exists()
    result = invoke("batch", models, "-o", out, *LOWRANK, "--address", "auto")
    assert result.exit_code == 2 and "--address needs --executor ray" in result.stderr


def test_ctrl_c_in_process_keeps_finished_models_and_says_so(tmp_path, monkeypatch):
    """The second model is interrupted: exit 130, one line, the first kept, the rest marked."""
    models, out = _models(tmp_path / "models"), tmp_path / "out"
    calls = []

    def convert_then_interrupt(task):
        calls.append(task)
        if len(calls) == 2:
            (out / ".onnxcompress-half").mkdir()  # what a killed save leaves
            (out / ".m1.report.json.x1y2").write_text("{")
            raise KeyboardInterrupt
        return core.convert(task)

    monkeypatch.setattr("onnxcompress.batch.local.convert", convert_then_interrupt)
    result = invoke("batch", models, "-o", out, *LOWRANK)
    assert_one_clear_line(result, 130, "interrupted: 1 of 3 models finished", "again to resume")
    assert _statuses(out) == {"m0.onnx": "ok", "m1.onnx": "interrupted", "m2.onnx": "interrupted"}
    assert sorted(p.name for p in out.iterdir()) == ["m0.onnx", "m0.report.json", "summary.json"]


def test_remove_temp_files_leaves_what_is_not_ours(tmp_path):
    target = tmp_path / "m.onnx"
    (tmp_path / ".onnxcompress-abc").mkdir()
    for name in (".m.report.json.tmp1", ".summary.json.tmp2", ".notes.txt.tmp3", "m.onnx"):
        (tmp_path / name).write_text("x")
    core.remove_temp_files(tmp_path, [target])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.tmp3", "m.onnx"]


def test_sigint_stops_worker_processes_and_leaves_nothing_half_written(tmp_path):
    """A real Ctrl-C to a --jobs 2 batch once a first model is written: the workers are
    terminated mid-model, exit 130, and the folder holds whole outputs and their reports."""
    models = tmp_path / "models"
    models.mkdir()
    for i in range(8):  # enough work that the batch is still running when the signal comes
        (models / f"cnn{i}.onnx").write_bytes((FIXTURES / "mnist_cnn.onnx").read_bytes())
    out = tmp_path / "out"
    command = [sys.executable, "-m", "onnxcompress", "batch", str(models), "-o", str(out)]
    command += ["-p", "codebook:bits=4", "--dim", "N=1", "--jobs", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.report.json")) and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.strip()][-1].startswith(
        "Error: interrupted"
    )
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no temporary file or folder
    outputs = [n for n in names if n.endswith(".onnx")]
    assert 1 <= len(outputs) < 8
    for name in outputs:  # every output is whole, with its report
        onnx.checker.check_model(str(out / name))
    statuses = _statuses(out)
    assert "interrupted" in statuses.values()


def test_steps_already_done_count_at_once_and_stay_out_of_the_pace():
    from onnxcompress.progress import Steps

    lines: list[str] = []
    steps = Steps(lines.append, "compressing", 4, already=2)
    steps.done()
    steps.done()
    assert lines[0].endswith(" 2/4") and "left" not in lines[0]
    assert "s left" in lines[1] and lines[1].endswith(" 3/4") and lines[2].endswith(" 4/4")


def test_driver_tasks_name_outputs_from_the_manifest_first(tmp_path):
    from onnxcompress.batch.manifest import Member

    job = core.Job(core.Recipe.from_options(["lowrank:rank=2"]), None, None, core.Options())
    members = [
        Member(tmp_path / "a" / "m.onnx", job),
        Member(tmp_path / "b" / "x.onnx", job, output="m.onnx"),
    ]
    tasks = driver.tasks(members, tmp_path / "out")
    assert [t.target.name for t in tasks] == ["m-1.onnx", "m.onnx"]
    assert tasks[0].fingerprint == tasks[1].fingerprint


def test_a_ray_that_cannot_be_reached_is_one_line_exit_2(tmp_path, monkeypatch):
    class Unreachable:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            raise ConnectionError(f"Could not find any running Ray instance at {kwargs['address']}")

    monkeypatch.setitem(sys.modules, "ray", Unreachable)
    models, out = _models(tmp_path / "models", count=1), tmp_path / "out"
    args = ["--executor", "ray", "--address", "auto"]
    result = invoke("batch", models, "-o", out, *LOWRANK, *args)
    assert_one_clear_line(result, 2, "cannot start or reach Ray at auto", "running Ray instance")
    assert not (out / "m0.onnx").exists()


def test_a_ray_task_asks_for_memory_in_proportion_to_the_model(tmp_path):
    from onnxcompress.batch import ray_executor

    models = _models(tmp_path, count=1)
    task = core.Task(models / "m0.onnx", tmp_path / "o.onnx", None, "")
    size = (models / "m0.onnx").stat().st_size
    assert ray_executor.task_memory(task) == (512 << 20) + 2 * size
    assert ray_executor.task_memory(task, largest_node=100 << 20) == 100 << 20


def test_changed_external_data_converts_the_model_again(tmp_path):
    """The input hash covers the external data file, not only the small .onnx beside it."""
    models, out = tmp_path / "models", tmp_path / "out"
    models.mkdir()

    def save(seed):
        model = matmul_model([3, 64], k=64, n=64)
        weight = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "W"))
        (models / "m.data").unlink(missing_ok=True)  # onnx.save appends to a data file
        onnx.save(
            model,
            models / "m.onnx",
            save_as_external_data=True,
            location="m.data",
            size_threshold=0,
        )

    save(0)
    assert invoke("batch", models, "-o", out, *LOWRANK).exit_code == 0
    hashes = json.loads((out / "m.report.json").read_text())["provenance"]["input_sha256"]
    assert sorted(hashes) == ["m.data", "m.onnx"]
    save(0)
    assert invoke("batch", models, "-o", out, *LOWRANK).exit_code == 0
    assert _statuses(out) == {"m.onnx": "skipped (done)"}
    onnx_bytes = (models / "m.onnx").read_bytes()
    save(1)  # the same .onnx file, other weights in m.data
    assert (models / "m.onnx").read_bytes() == onnx_bytes
    assert invoke("batch", models, "-o", out, *LOWRANK).exit_code == 0
    assert _statuses(out) == {"m.onnx": "ok"}
