"""Speed-ups measured by ``latency.speedup``, remembered within a run and across runs, so a
layer shape already timed on this machine is not timed again (``min_speedup`` in lowrank and
int4).

An entry is keyed by what decides the timing: the two isolated models' graphs (op types,
attributes, input and weight shapes and dtypes, with value names normalized and weight
*values* left out), the onnxruntime version, the CPU, the timing settings and the format
version. Entries live in ``timings.json`` in ``$ONNXCOMPRESS_CACHE_DIR``, else
``$XDG_CACHE_HOME/onnxcompress``, else ``~/.cache/onnxcompress``; ``ONNXCOMPRESS_CACHE_DIR=""``
keeps them in memory only. The cache never fails a run: a file that cannot be read is ignored
(and replaced on the next save), a folder that cannot be written means no persistence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from onnxcompress import latency

logger = logging.getLogger("onnxcompress.timing_cache")

FORMAT = 1
#: At most this many entries are kept; the least recently used go first.
MAX_ENTRIES = 4000
FILE_NAME = "timings.json"
ENV = "ONNXCOMPRESS_CACHE_DIR"


@dataclass(frozen=True)
class Timing:
    speedup: float
    before_us: float
    after_us: float
    source: str  # "measured" or "cache"


def default_folder() -> Path | None:
    """Where timings persist, or None when ``ONNXCOMPRESS_CACHE_DIR`` is set empty."""
    if ENV in os.environ:
        chosen = os.environ[ENV].strip()
        return Path(chosen).expanduser() if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxcompress"


@lru_cache(maxsize=1)
def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str]:
    """What besides the models decides a timing."""
    return {
        "onnxruntime": ort.__version__,
        "cpu": _cpu(),
        "arch": platform.machine(),
        "timing": f"threads=1 runs={latency.SPEEDUP_RUNS} rounds={latency.SPEEDUP_ROUNDS}",
        "format": str(FORMAT),
    }


class TimingCache:
    """One run's timings: an in-memory table, read from ``folder`` at the start and merged
    back into it by ``save``."""

    def __init__(self, folder: Path | str | None = "default", env: dict | None = None) -> None:
        self.folder = default_folder() if folder == "default" else folder
        self.path = None if self.folder is None else Path(self.folder) / FILE_NAME
        self.env = env if env is not None else machine()
        self.entries = _read(self.path)
        self.new: dict[str, dict] = {}
        self.hits = self.misses = 0

    def speedup(self, before: ir.Model, after: ir.Model) -> Timing:
        """``latency.speedup`` of the two models, timed once per key."""
        key = self.key(before, after)
        entry = self.new.get(key) or self.entries.get(key)
        if entry is not None:
            self.hits += 1
            entry["used"] = time.time()
            self.new[key] = entry
            return Timing(entry["speedup"], entry["before_us"], entry["after_us"], "cache")
        self.misses += 1
        before_us, after_us = latency.speedup_times(before, after)
        ratio = before_us / after_us if after_us > 0 else float("inf")
        self.new[key] = {
            "speedup": ratio,
            "before_us": before_us,
            "after_us": after_us,
            "used": time.time(),
        }
        return Timing(ratio, before_us, after_us, "measured")

    def key(self, before: ir.Model, after: ir.Model) -> str:
        text = json.dumps([self.env, _describe(before), _describe(after)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def note(self) -> str | None:
        """One line for the pass report, or None when nothing was timed."""
        if not self.hits + self.misses:
            return None
        where = self.path if self.path is not None else "memory only"
        return (
            f"min_speedup timings: {self.misses} measured, {self.hits} read from the "
            f"timing cache ({where})"
        )

    def finish(self, notes: list[str]) -> None:
        """At the end of a pass: save the timings, and add the pass's note to ``notes``."""
        self.save()
        if note := self.note():
            notes.append(note)

    def save(self) -> None:
        """Merge this run's entries into the file (another process may have written it since)
        and write it atomically; any failure only costs persistence."""
        if self.path is None or not self.new:
            return
        try:
            merged = {**_read(self.path), **self.new}
            if len(merged) > MAX_ENTRIES:
                newest = sorted(merged, key=lambda k: merged[k].get("used", 0))[-MAX_ENTRIES:]
                merged = {k: merged[k] for k in newest}
            _write(self.path, {"format": FORMAT, "entries": merged})
        except Exception as exc:  # a cache must never fail a run: a full disk, odd entries
            logger.debug("timing cache not saved: %s", exc)


def _read(path: Path | None) -> dict[str, dict]:
    """The file's entries; nothing if it is missing, unreadable or not what this writes."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["entries"] if data.get("format") == FORMAT else {}
        return {
            key: entry
            for key, entry in entries.items()
            if all(isinstance(entry.get(k), int | float) for k in ("speedup", "before_us"))
            and isinstance(entry.get("after_us"), int | float)
        }
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        if not isinstance(exc, FileNotFoundError):
            logger.debug("timing cache ignored: %s", exc)
        return {}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".timings-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file)
        os.replace(temporary, path)  # last writer wins; readers never see half a file
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _describe(model: ir.Model) -> list:
    """The graph as plain data, without weight values and with value names replaced by their
    order of appearance (two layers of one shape look alike)."""
    names: dict[str, int] = {}

    def ref(value: ir.Value | None) -> int | None:
        if value is None:
            return None
        return names.setdefault(value.name or f"#{id(value)}", len(names))

    graph = model.graph
    inputs = [(ref(v), _type(v)) for v in graph.inputs]
    weights = sorted((ref(v), _type(v)) for v in graph.initializers.values())
    nodes = [
        (
            node.domain,
            node.op_type,
            [ref(v) for v in node.inputs],
            [ref(v) for v in node.outputs],
            sorted((name, _attribute(attr)) for name, attr in node.attributes.items()),
        )
        for node in graph
    ]
    outputs = [ref(v) for v in graph.outputs]
    return [sorted(model.opset_imports.items()), inputs, weights, nodes, outputs]


def _type(value: ir.Value) -> list:
    tensor = value.const_value
    if tensor is not None:
        return [str(tensor.dtype), list(tensor.shape)]
    shape = None if value.shape is None else [str(d) for d in value.shape]
    return [str(value.dtype), shape]


def _attribute(attr) -> str:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):  # a constant's values need not decide timing
        return f"tensor {value.dtype} {list(value.shape)}"
    return repr(value)
