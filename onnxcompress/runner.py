"""onnxruntime sessions on a model: its outputs, intermediate values (capture), their shapes.

Memory: onnxruntime allocates every value a session exposes as an output on every run, whether
the caller fetches it or not, beside the run's working set, and both grow with the samples in
the run: at batch 8, the activations of a mid-sized CNN add up to most of a gigabyte. Capture
runs therefore go one sample at a time (as fast, on onnxruntime's CPU kernels, which also give
each sample the same bits either way: the same session computes them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.calibration import Feed
from onnxcompress.errors import CannotRun, first_line
from onnxcompress.model_io import save

logger = logging.getLogger(__name__)

#: Lets a model handed over as bytes find external data files in a folder.
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
#: A run option: after the run, the CPU arena releases the memory no tensor holds any more.
_SHRINK_ARENA = "memory.enable_memory_arena_shrinkage"


class Runner:
    """An onnxruntime session for a model (ir.Model, serialized bytes or a file).

    ``extra_outputs`` names intermediate values to expose as well: ``run`` still returns the
    model's own outputs, ``capture`` returns the extras by name (activation capture for
    calibration, data-aware passes and shape observation), ``capture_parts`` the same a sample
    at a time. ``with_outputs`` opens another session on the same model with other extras,
    e.g. on the original model after passes have changed the working copy. ``threads`` sets
    onnxruntime's intra-op threads (default: its own choice, one per physical core).
    ``shapes_only`` exposes the shapes of the extras instead of their values (small vectors).
    ``release`` lets the session go until the next run opens it again; ``close`` for good.
    ``overridable`` names initializers exposed as graph inputs too: a run may feed a value
    in their place (probes).
    """

    def __init__(
        self,
        model: ir.Model | bytes | str | Path,
        label: str = "model",
        extra_outputs: Sequence[str] = (),
        external_folder: str | None = None,
        threads: int | None = None,
        *,
        shapes_only: bool = False,
        overridable: Sequence[str] = (),
    ) -> None:
        self._tmp: Path | None = None
        self._folder = external_folder  # where external data lives, for bytes sources
        self._added: list[str] = []
        self._fetch: dict[str, str] = {}  # extra name -> the session output that carries it
        self._shapes_only = shapes_only
        self.threads = threads
        self._whole = False  # set when a capture's parts did not join: feeds run whole
        options, self._run_options = _options(threads, shapes_only)
        self._options, self._extra = options, list(dict.fromkeys(extra_outputs))
        self._overridable = set(overridable)
        self.label, self._closed = label, False
        try:
            self._origin = self._keep(model)
            self.session: ort.InferenceSession | None = self._open()
        except Exception as exc:  # onnxruntime raises several unrelated types
            self.close()
            raise CannotRun(f"onnxruntime cannot run the {label}: {_first_line(exc)}") from None
        names = [o.name for o in self.session.get_outputs()]
        self.extra_outputs = [n for n in extra_outputs if self._fetch.get(n, n) in names]
        self.output_names = names[: len(names) - len(self._added)]
        inputs = self.session.get_inputs()
        self._inputs = {i.name for i in inputs}
        # a part can only be fed to inputs whose leading (sample) axis is not fixed
        self._splittable = {i.name for i in inputs if i.shape and not isinstance(i.shape[0], int)}

    def _keep(self, model: ir.Model | bytes | str | Path) -> str | bytes:
        """The model as the runner keeps it to open sessions from: bytes or a file's path."""
        if isinstance(model, ir.Model):
            model = self._materialize(model)
        if not isinstance(model, bytes):
            self._folder = self._folder or str(Path(model).resolve().parent)
            model = str(model)
        if self._folder:
            self._options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, self._folder)
        return model

    def _open(self) -> ort.InferenceSession:
        source = self._origin
        if self._extra or self._overridable:
            if isinstance(source, bytes):
                proto = onnx.load_from_string(source)
            else:
                proto = onnx.load(source, load_external_data=False)
            _expose_initializers(proto.graph, self._overridable)
            source = self._with_outputs(proto, self._extra).SerializeToString()
        return ort.InferenceSession(source, self._options, providers=["CPUExecutionProvider"])

    def _materialize(self, model: ir.Model) -> str:
        """A temporary file for the model, its weights in a data file beside it: onnxruntime
        reads them from there, sessions that expose more values add outputs to the small
        graph alone, and the process keeps no serialized copy of the weights."""
        self._tmp = Path(tempfile.mkdtemp(prefix="onnxcompress-session-"))
        # removed by close, or when the runner is collected unclosed (or at exit)
        self._remove_tmp = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        path = self._tmp / "model.onnx"
        save(model, path, external_data=True)
        return str(path)

    def _with_outputs(self, proto: onnx.ModelProto, extra: list[str]) -> onnx.ModelProto:
        present = {o.name for o in proto.graph.output}
        if self._shapes_only:
            extra = self._read_shapes(proto.graph, extra)
        self._added = [n for n in extra if n not in present]
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in self._added)
        return proto

    def _read_shapes(self, graph: onnx.GraphProto, names: list[str]) -> list[str]:
        """Give each named value a Shape node right after the node that makes it (onnxruntime
        runs nodes in this order, and a reader left at the end would keep every value alive
        until then); return the names of their outputs."""
        wanted = set(names)
        nodes = []
        for node in [None, *graph.node]:  # None: the graph inputs, before any node
            if node is not None:
                nodes.append(node)
            made = [v.name for v in graph.input] if node is None else list(node.output)
            for name in (name for name in made if name in wanted):
                self._fetch[name] = f"{name}.onnxcompress.shape"
                nodes.append(onnx.helper.make_node("Shape", [name], [self._fetch[name]]))
        graph.ClearField("node")
        graph.node.extend(nodes)
        return [self._fetch[name] for name in names if name in self._fetch]

    def with_outputs(self, names: Sequence[str], label: str | None = None) -> Runner:
        """Another session on this runner's model exposing ``names``; close it after use
        (before this one, which owns any temporary file)."""
        return Runner(self._origin, label or self.label, names, self._folder, self.threads)

    def with_overridable(self, names: Sequence[str], label: str | None = None) -> Runner:
        """Another session on this runner's model, with its extra outputs, in which the
        initializers ``names`` may be fed; close it after use (before this one, which owns
        any temporary file)."""
        return Runner(
            self._origin,
            label or self.label,
            self._extra,
            self._folder,
            self.threads,
            overridable=names,
        )

    def value_names(self) -> set[str]:
        """Every value this runner's model computes or takes in (weights not loaded)."""
        if isinstance(self._origin, bytes):
            proto = onnx.load_from_string(self._origin)
        else:
            proto = onnx.load(self._origin, load_external_data=False)
        names = {value.name for value in proto.graph.input}
        names.update(name for node in proto.graph.node for name in node.output)
        return names

    def run(self, feed: Feed) -> list[np.ndarray]:
        """The model's own outputs on ``feed``."""
        return self._run(self.output_names, feed)

    def capture(self, feed: Feed, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The ``extra_outputs`` values (or only ``names`` of them, which may also name graph
        inputs) on ``feed``, by name, for the whole feed: a feed run in parts is joined."""
        wanted = list(names) if names is not None else self.extra_outputs
        if self._whole or not self._splits(feed):
            return self._values(wanted, feed)
        computed = [name for name in wanted if name not in self._inputs]
        joined = _joined(self._parts(feed, computed), _samples(feed) or 0)
        if joined is None:  # a value that does not carry the samples on axis 0
            self._whole = True
            return self._values(wanted, feed)
        return {name: feed[name] if name in self._inputs else joined[name] for name in wanted}

    def capture_parts(
        self, feed: Feed, names: Sequence[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The values ``capture`` returns, a part of ``feed`` (one sample) at a time, for
        statistics that fold each part as it comes. Each part holds every name as its own run
        makes it (a value that does not depend on the samples is the same in each)."""
        wanted = list(names) if names is not None else self.extra_outputs
        if self._splits(feed):
            yield from self._parts(feed, wanted)
        else:
            yield self._values(wanted, feed)

    def part_count(self, feed: Feed) -> int:
        """How many parts ``capture_parts`` cuts ``feed`` into."""
        return (_samples(feed) or 1) if self._splits(feed) else 1

    def _parts(self, feed: Feed, wanted: list[str]) -> Iterator[dict[str, np.ndarray]]:
        for start in range(_samples(feed) or 0):
            part = {name: array[start : start + 1] for name, array in feed.items()}
            yield self._values(wanted, part)

    def _values(self, names: list[str], feed: Feed) -> dict[str, np.ndarray]:
        """``names`` on ``feed``, graph inputs taken from the feed itself (unless read through
        a Shape node)."""
        computed = [n for n in names if n not in self._inputs or n in self._fetch]
        found = dict(zip(computed, self._run([self._fetch.get(n, n) for n in computed], feed)))
        return {n: found[n] if n in found else feed[n] for n in names}

    def _splits(self, feed: Feed) -> bool:
        """Whether a capture runs ``feed`` a sample at a time: sessions that expose values of
        their own do, on feeds of several samples whose inputs all take any number of them."""
        if self._shapes_only or not self._added or not feed or not set(feed) <= self._splittable:
            return False
        return (_samples(feed) or 0) > 1

    def _run(self, names: list[str] | None, feed: Feed) -> list[np.ndarray]:
        if names == []:
            return []
        if self.session is None:
            self._reopen()
        try:
            return self.session.run(names, feed, self._run_options)
        except Exception as exc:
            raise CannotRun(f"onnxruntime failed to run: {_first_line(exc)}") from None

    def _reopen(self) -> None:
        if self._closed:
            raise CannotRun(f"the session on the {self.label} is closed")
        try:
            self.session = self._open()
        except Exception as exc:
            raise CannotRun(
                f"onnxruntime cannot run the {self.label}: {_first_line(exc)}"
            ) from None

    def release(self) -> None:
        """Let the session go until the next run, which opens it again: a runner kept for
        later (the teacher, held for validation) need not hold its memory meanwhile."""
        self.session = None
        _give_back_freed_memory()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Let the session go for good, and any temporary file."""
        self._closed = True
        if self._tmp is not None:
            self._remove_tmp()
            self._tmp = None
        self.release()


def _expose_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """The initializers ``names`` listed as graph inputs too (their data stays where it is)."""
    inputs = {value.name for value in graph.input}
    for tensor in graph.initializer:
        if tensor.name in names and tensor.name not in inputs:
            info = onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            graph.input.append(info)


def _joined(parts: Iterator[dict[str, np.ndarray]], samples: int) -> dict | None:
    """One-sample parts' values, each copied into its place in one array as it comes (no
    more than a part is held beside the result); None when a value does not hold its sample
    on axis 0: a shape, a constant or samples on another axis. A constant of length 1 looks
    like a sample, so a value the first two parts agree on is taken for one (identical samples
    merely cost a whole run)."""
    joined: dict[str, np.ndarray] = {}
    for index, part in enumerate(parts):
        for name, value in part.items():
            if not isinstance(value, np.ndarray):  # a sequence or a map
                return None
            if name not in joined:
                joined[name] = np.empty((samples, *value.shape[1:]), value.dtype)
            if not _fits(joined[name], value, index):
                return None
            joined[name][index] = value[0]
    return joined


def _fits(joined: np.ndarray, value: np.ndarray, index: int) -> bool:
    """Whether ``value`` can be sample ``index`` of what ``joined`` gathers."""
    if value.shape != (1, *joined.shape[1:]) or value.dtype != joined.dtype:
        return False
    return index != 1 or not np.array_equal(joined[0], value[0])


def _options(threads: int | None, shapes_only: bool) -> tuple[ort.SessionOptions, ort.RunOptions]:
    options, run_options = ort.SessionOptions(), ort.RunOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    # Idle worker threads would otherwise spin after each run, stealing the cores from the
    # next session and skewing side-by-side timings (measure_latency).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _shared_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    # The memory pattern plans one block per input shape for all of a run's values, from the
    # second run on, beside the pieces the first run took: a session's high-water mark grows
    # by half again (200 MB more to validate a QDQ CNN), for a few percent of speed.
    options.enable_mem_pattern = False
    if shapes_only:
        # run each Shape reader where the graph puts it, right after its value's maker
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        # shapes do not depend on optimizations, which would keep reordered weights too
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # a one-off run: the arena lets go of what it took once it is over
        run_options.add_run_config_entry(_SHRINK_ARENA, "cpu:0")
    return options, run_options


@functools.cache
def _shared_arena() -> bool:
    """One onnxruntime CPU memory arena for every session of the process. An arena keeps the
    most a session ever needed until the session goes; sessions here run one at a time (the
    teacher, captures, checks, validation), so they can take turns with the same memory."""
    try:
        kind, memory = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, ort.OrtMemType.DEFAULT
        ort.create_and_register_allocator(ort.OrtMemoryInfo("Cpu", kind, 0, memory), None)
    except Exception as exc:  # an onnxruntime without it: each session keeps its own arena
        logger.debug("no shared onnxruntime arena: %s", exc)
        return False
    return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only


def _give_back_freed_memory() -> None:
    """Return what a session that went leaves behind to the system. The shared arena keeps
    what the session's runs took (a run with the shrinkage option makes it let go of the
    unused part: a one-element run serves). A session's weights, plans and buffers go back to
    glibc, which keeps most of them (served from its heap once it has raised its threshold
    for fresh mappings): each session would leave the process larger than it found it."""
    shrinker = _arena_shrinker()
    if shrinker is not None:
        shrinker.run(None, {"x": np.zeros(1, np.float32)}, _shrink_options())
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _arena_shrinker() -> ort.InferenceSession | None:
    """A session on ``y = Identity(x)`` that allocates from the shared arena."""
    if not _shared_arena():
        return None
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "shrink",
        [tensor("x", onnx.TensorProto.FLOAT, [1])],
        [tensor("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    options, _ = _options(None, shapes_only=False)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@functools.cache
def _shrink_options() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry(_SHRINK_ARENA, "cpu:0")
    return options


def _samples(feed: Feed) -> int | None:
    """The common length of the feed's leading axes, or None."""
    lengths = {np.shape(array)[0] if np.ndim(array) else None for array in feed.values()}
    return lengths.pop() if len(lengths) == 1 else None


def observe_shapes(model: ir.Model, feed: Feed, names: Iterable[str]) -> dict[str, tuple]:
    """Shapes of the named activations as onnxruntime computes them on ``feed``.

    The fallback where onnx's shape inference gives up (dynamic Reshape chains in exports).
    Each value is read through a Shape node, so the run holds small vectors, not the values.
    """
    try:
        with Runner(model, "model", [n for n in names if n], shapes_only=True) as runner:
            return {name: tuple(int(d) for d in s) for name, s in runner.capture(feed).items()}
    except CannotRun as exc:  # accounting only: never fatal
        logger.debug("observing shapes failed: %s", exc)
        return {}


def _first_line(exc: BaseException) -> str:
    return first_line(exc).replace("[ONNXRuntimeError] : ", "")[:300]
