"""batch --executor ray on a local Ray head (one for the module, two CPUs): the same bytes as
the local executor, a corrupt model reported with its reason and exit 1, a worker killed
mid-task retried, resume, and a second process joining the Ray with --address."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest

from onnxcompress.batch.ray_executor import TEST_DIE_ONCE
from tests.conftest import FIXTURES
from tests.passes.lowrank.test_lowrank import matmul_model
from tests.test_cli import invoke

ray = pytest.importorskip("ray")

RECIPE = ["-p", "lowrank:rank=4", "--dim", "N=1"]


@pytest.fixture(scope="module")
def die_once(tmp_path_factory):
    """The marker file of the test-only worker-death hook (a task that finds it dies)."""
    return tmp_path_factory.mktemp("hook") / "die-once"


@pytest.fixture(scope="module", autouse=True)
def local_ray(die_once):
    ray.init(
        num_cpus=2,
        object_store_memory=100 << 20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {TEST_DIE_ONCE: str(die_once)}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two trained fixtures, two small models and a corrupt file."""
    models = tmp_path_factory.mktemp("models")
    for name in ("mnist_mlp.onnx", "mnist_cnn.onnx"):
        (models / name).write_bytes((FIXTURES / name).read_bytes())
    for i in range(2):
        onnx.save(matmul_model([3, 64], k=64, n=64 + i), models / f"m{i}.onnx")
    (models / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 20)
    return models


def _summary(out):
    summary = json.loads((out / "summary.json").read_text())
    return {os.path.basename(m["model"]): m for m in summary["models"]}


def test_ray_writes_the_same_bytes_as_local_and_reports_the_corrupt_model(folder, tmp_path):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert invoke("batch", folder, "-o", local, *RECIPE).exit_code == 1
    result = invoke("batch", folder, "-o", on_ray, *RECIPE, "--executor", "ray")
    assert result.exit_code == 1, result.output
    assert "1 of 5 models failed" in result.stderr
    models = _summary(on_ray)
    assert models["corrupt.onnx"]["status"] == "failed"
    assert "not an ONNX model" in models["corrupt.onnx"]["detail"]
    assert {name: m["status"] for name, m in models.items() if name != "corrupt.onnx"} == {
        "mnist_mlp.onnx": "ok",
        "mnist_cnn.onnx": "ok",
        "m0.onnx": "ok",
        "m1.onnx": "ok",
    }
    names = sorted(p.name for p in local.glob("*.onnx"))
    assert names == sorted(p.name for p in on_ray.glob("*.onnx")) and len(names) == 4
    for name in names:
        assert (on_ray / name).read_bytes() == (local / name).read_bytes(), name


def test_a_worker_killed_mid_task_is_retried_and_the_batch_completes(folder, tmp_path, die_once):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("m0.onnx", "m1.onnx", "mnist_mlp.onnx"):
        (models / name).write_bytes((folder / name).read_bytes())
    die_once.write_text("the first task to see this file kills its worker")
    out = tmp_path / "out"
    result = invoke("batch", models, "-o", out, *RECIPE, "--executor", "ray")
    assert not die_once.exists()  # a worker died in a task
    assert result.exit_code == 0, result.output
    assert {m["status"] for m in _summary(out).values()} == {"ok"}  # ... and it was retried
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_resume_on_ray_and_joining_a_running_ray_with_address(folder, tmp_path):
    """A second process joins this module's Ray with --address (as on a cluster): every model
    done on the first run is skipped, --force converts them again."""
    out = tmp_path / "out"
    assert invoke("batch", folder, "-o", out, *RECIPE, "--executor", "ray").exit_code == 1
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "onnxcompress", "batch", str(folder), "-o", str(out)]
    command += [*RECIPE, "--executor", "ray", "--address", address]
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 1, again.stderr
    statuses = {name: m["status"] for name, m in _summary(out).items()}
    assert statuses.pop("corrupt.onnx") == "failed"  # a failure is tried again, and fails
    assert set(statuses.values()) == {"skipped (done)"}
    forced = invoke("batch", folder, "-o", out, *RECIPE, "--executor", "ray", "--force")
    assert forced.exit_code == 1
    assert {m["status"] for m in _summary(out).values()} == {"ok", "failed"}
    assert ray.is_initialized()  # the caller's Ray is left running
