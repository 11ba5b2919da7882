"""The Ray executor: each model of a batch is one Ray task, on a Ray started here for the batch
or on an existing cluster (``--address``). Ray is an optional extra, imported only here.

A task runs the same ``convert`` as the local executor (same bytes out), writes its output and
report as soon as it is done, asks for one CPU and memory in proportion to the model, and is
retried once when its worker dies (a node lost, the out-of-memory killer), never when the
model fails: ``convert`` never raises for a model, and exceptions are not retried."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from onnxcompress.batch.core import Task, convert, failed, input_bytes
from onnxcompress.batch.local import OnResult
from onnxcompress.errors import OnnxCompressError, first_line

#: Memory a task asks Ray for: a fixed base plus k times the model's bytes on disk (external
#: data included). A run fits in a few hundred MB plus about the model's size (the memory rule
#: of ARCHITECTURE.md: EfficientNet-Lite1 peaks under 0.5 GB); k = 2 leaves room for the
#: original weights and the rewritten ones side by side.
TASK_BASE_MEMORY = 512 << 20
TASK_MEMORY_PER_MODEL_BYTE = 2

#: The object store of a Ray started for one batch: results are small dicts, models never
#: travel through it (tasks read and write the shared filesystem).
_OBJECT_STORE_BYTES = 100 << 20

#: Test-only: with this variable naming a file, the first task that finds the file removes it
#: and kills its own worker, as the out-of-memory killer or a lost node would, so a test can
#: check that the task is retried. Never set it outside tests.
TEST_DIE_ONCE = "ONNXCOMPRESS_TEST_DIE_ONCE"


class RayUnavailable(OnnxCompressError):
    """Ray is not installed, or the cluster cannot be reached."""


def run(tasks: list[Task], jobs: int, address: str | None, on_result: OnResult) -> None:
    """Convert every task on Ray; ``on_result(index, result)`` as each one finishes. Without
    ``address`` a Ray of ``jobs`` CPUs is started for the batch and shut down after it; a Ray
    the caller already initialized is used as it is."""
    ray = _import_ray()
    connected = _connect(ray, address, jobs)
    try:
        _run_tasks(ray, tasks, on_result)
    finally:
        if connected:  # our own Ray stops; on a cluster this only disconnects
            ray.shutdown()


def require_ray() -> None:
    """Fail with one line, before any work, when Ray is not installed."""
    _import_ray()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable("ray is not installed: pip install 'onnxcompress[ray]'") from None
    return ray


def _connect(ray: Any, address: str | None, jobs: int) -> bool:
    """Start or join Ray; False when the caller's Ray is already up (then it is left alone)."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray Client warns, then raises: one line is ours
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(
                    address="local",  # our own, even where RAY_ADDRESS or `ray start` says else
                    num_cpus=jobs,
                    object_store_memory=_OBJECT_STORE_BYTES,
                    include_dashboard=False,
                    **quiet,
                )
    except Exception as exc:  # ConnectionError, a bad address, a version mismatch
        where = f"Ray at {address}" if address else "a local Ray"
        raise RayUnavailable(f"cannot start or reach {where}: {first_line(exc)}") from None
    return True


def _run_tasks(ray: Any, tasks: list[Task], on_result: OnResult) -> None:
    remote = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=False)(_convert_on_worker)
    largest = _largest_node_memory(ray)
    pending = {
        remote.options(memory=task_memory(task, largest)).remote(task): index
        for index, task in enumerate(tasks)
    }
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                on_result(index, _result(ray, ref, tasks[index]))
    except BaseException:  # Ctrl-C: stop every task now, mid-model (outputs are atomic)
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.wait(list(pending), num_returns=len(pending), timeout=10)
        raise


def _result(ray: Any, ref: Any, task: Task) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the worker died twice, or Ray lost the task
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return failed(task, f"ray task failed: {type(exc).__name__}: {first}")


def task_memory(task: Task, largest_node: int | None = None) -> int:
    """Bytes of memory a model's task asks for; at most the largest node's memory, so a model
    larger than the estimate allows still runs (alone on that node) instead of waiting for
    a node that will never come."""
    need = TASK_BASE_MEMORY + TASK_MEMORY_PER_MODEL_BYTE * input_bytes(task.model)
    return min(need, largest_node) if largest_node else need


def _largest_node_memory(ray: Any) -> int | None:
    sizes = [int(node["Resources"].get("memory", 0)) for node in ray.nodes() if node.get("Alive")]
    return max(sizes, default=0) or None


def _convert_on_worker(task: Task) -> dict[str, Any]:
    _test_die_once()
    return convert(task)


def _test_die_once() -> None:
    """The test-only hook of ``TEST_DIE_ONCE`` (removing the file is atomic: one task dies)."""
    marker = os.environ.get(TEST_DIE_ONCE)
    if not marker:
        return
    try:
        os.remove(marker)
    except FileNotFoundError:
        return
    os._exit(1)
