"""A whole batch, whatever executes it: members into tasks (output names, overwrite guards,
fingerprints), the models an earlier run already converted skipped, the rest handed to the
local or the Ray executor with one progress line, summary.json written (atomically) at the
end, or at Ctrl-C with what finished, after the half-written files are removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onnxcompress.batch import core, local, ray_executor
from onnxcompress.batch.manifest import Member
from onnxcompress.errors import OnnxCompressError
from onnxcompress.pipeline import write_json
from onnxcompress.progress import Progress, Steps

EXECUTORS = ("local", "ray")


class Interrupted(OnnxCompressError):
    """Ctrl-C: the batch stopped, its finished models kept, nothing half-written left."""

    exit_code = 130


def tasks(members: list[Member], output_dir: Path) -> list[core.Task]:
    """One task per member, its output named and checked against every input and output."""
    models = [member.model for member in members]
    targets = core.targets(models, output_dir, [member.output for member in members])
    core.refuse_overwrites(models, targets, output_dir)
    data_hashes: dict[str, str] = {}  # a calibration set many models share is hashed once
    return [
        core.Task(member.model, target, member.job, core.fingerprint(member.job, data_hashes))
        for member, target in zip(members, targets)
    ]


def run(
    tasks: list[core.Task],
    output_dir: Path,
    executor: str = "local",
    jobs: int = 1,
    address: str | None = None,
    force: bool = False,
    progress: Progress = None,
) -> list[dict[str, Any]]:
    """Convert every task not already done (all of them with ``force``); one result each, in
    order. summary.json is written before this returns, or raises ``Interrupted``."""
    if executor == "ray":
        ray_executor.require_ray()  # before any work: one line, exit 2
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    try:
        _convert(tasks, results, executor, jobs, address, force, progress)
    except KeyboardInterrupt:
        finished = _finish(tasks, results, output_dir)
        done = sum(r["status"] != "interrupted" for r in finished)
        raise Interrupted(
            f"interrupted: {done} of {len(tasks)} models finished, nothing half-written left; "
            "run the same command again to resume"
        ) from None
    return _finish(tasks, results, output_dir)


def _convert(tasks, results, executor, jobs, address, force, progress) -> None:
    """Fill ``results``: the models done before skipped, the others converted."""
    todo = []
    for index, task in enumerate(tasks):
        if not force and core.is_done(task):
            results[index] = core.skipped(task)
        else:
            todo.append(index)
    steps = Steps(progress, "compressing", len(tasks), already=len(tasks) - len(todo))

    def on_result(position: int, result: dict[str, Any]) -> None:
        results[todo[position]] = result
        steps.done()

    chosen = [tasks[index] for index in todo]
    if not chosen:  # all done before: no worker, no Ray to start
        return
    if executor == "ray":
        ray_executor.run(chosen, jobs, address, on_result)
    else:
        local.run(chosen, jobs, on_result)


def _finish(
    tasks: list[core.Task], results: list[dict[str, Any] | None], output_dir: Path
) -> list[dict[str, Any]]:
    """Remove what killed workers left, mark what never finished, write summary.json."""
    core.remove_temp_files(output_dir, [task.target for task in tasks])
    final = [
        result
        if result is not None
        else core.failed(task, "the batch was interrupted first", status="interrupted")
        for task, result in zip(tasks, results)
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "summary.json", core.summary(final))
    return final
