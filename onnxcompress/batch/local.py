"""The local executor: a batch's models one after another in this process, or ``jobs`` at a
time in worker processes of this machine. Ctrl-C stops it cleanly: pending models are
cancelled, workers terminated, and the caller removes what they left half-written."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from onnxcompress.batch.core import Task, convert, failed

OnResult = Callable[[int, dict[str, Any]], None]


def run(tasks: list[Task], jobs: int, on_result: OnResult) -> None:
    """Convert every task; ``on_result(index, result)`` as each one finishes."""
    if jobs <= 1 or len(tasks) <= 1:
        for index, task in enumerate(tasks):
            on_result(index, convert(task))
        return
    # spawn, not fork: a forked child can inherit a lock held by one of onnxruntime's or BLAS's
    # threads in the parent and hang for good
    spawn = multiprocessing.get_context("spawn")
    workers = min(jobs, len(tasks))
    pool = ProcessPoolExecutor(workers, mp_context=spawn, initializer=_leave_sigint_to_parent)
    try:
        _collect(pool, tasks, on_result)
    except BaseException:  # Ctrl-C (KeyboardInterrupt) or an error of the caller's callback
        _stop(pool)
        raise
    pool.shutdown()


def _collect(pool: ProcessPoolExecutor, tasks: list[Task], on_result: OnResult) -> None:
    pending = {pool.submit(convert, task): index for index, task in enumerate(tasks)}
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            index = pending.pop(future)
            try:
                result = future.result()
            except BrokenProcessPool:  # a worker was killed (out of memory?): the pool is gone
                result = failed(tasks[index], "a worker process died (out of memory?)")
            on_result(index, result)


def _leave_sigint_to_parent() -> None:
    """Workers ignore Ctrl-C: the terminal sends it to the whole process group, and the parent
    alone decides to stop them (a worker interrupted on its own would take the next model)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers now, mid-model: their outputs
    are written through temporary files, so what they leave is only temporary files."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14 and later
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    if terminate is not None:
        terminate()
        return
    for process in processes:  # before 3.14: the pool's own list of its worker processes
        process.terminate()
    for process in processes:
        process.join(timeout=10)
