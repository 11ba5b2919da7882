"""min_speedup's timing cache: one timing per key within a run and across runs, keyed by what
decides a timing (shapes and attributes, onnxruntime, the CPU), never failing a run."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import latency, timing_cache
from onnxcompress.timing_cache import TimingCache
from tests.passes.lowrank.test_lowrank_conv import conv_model


def _layer(seed: int = 0, spatial=(9, 11)) -> ir.Model:
    """A conv alone, its weights drawn from ``seed`` (values must not matter to the key)."""
    model = ir.from_proto(conv_model(spatial=spatial))
    node = next(iter(model.graph))
    weight = node.inputs[1].const_value.numpy()
    noise = np.random.default_rng(seed).standard_normal(weight.shape).astype(np.float32)
    node.inputs[1].const_value = ir.tensor(noise)
    return latency.isolate(node, [2, 4, *spatial], dict(model.opset_imports))


@pytest.fixture
def timed(monkeypatch):
    """Every onnxruntime timing the cache asks for, answered at once with 3 µs against 2."""
    calls = []

    def fake(before, after):
        calls.append((before, after))
        return 3.0, 2.0

    monkeypatch.setattr(latency, "speedup_times", fake)
    return calls


def test_a_repeated_shape_is_timed_once_in_a_run(tmp_path, timed):
    cache = TimingCache(tmp_path)
    first = cache.speedup(_layer(0), _layer(0))
    again = cache.speedup(_layer(1), _layer(2))  # other weights, same shapes
    assert len(timed) == 1
    assert (first.source, again.source) == ("measured", "cache")
    assert again.speedup == first.speedup == 1.5 and again.before_us == 3.0
    other = cache.speedup(_layer(0, spatial=(8, 8)), _layer(0, spatial=(8, 8)))
    assert other.source == "measured" and len(timed) == 2
    assert "timings: 2 measured, 1 read from the timing cache" in cache.note()


def test_timings_persist_across_runs_keyed_by_onnxruntime_and_cpu(tmp_path, timed):
    first = TimingCache(tmp_path)
    first.speedup(_layer(), _layer())
    first.save()
    second = TimingCache(tmp_path)
    assert second.speedup(_layer(), _layer()).source == "cache" and len(timed) == 1
    upgraded = TimingCache(tmp_path, env={**timing_cache.machine(), "onnxruntime": "9.9.9"})
    assert upgraded.speedup(_layer(), _layer()).source == "measured" and len(timed) == 2
    other_cpu = TimingCache(tmp_path, env={**timing_cache.machine(), "cpu": "another"})
    assert other_cpu.speedup(_layer(), _layer()).source == "measured" and len(timed) == 3


def test_a_corrupt_cache_file_is_ignored_and_replaced(tmp_path, timed):
    path = tmp_path / timing_cache.FILE_NAME
    for junk in ("{not json", '{"format": 1, "entries": {"k": "v"}}', "[1, 2]"):
        path.write_text(junk)
        cache = TimingCache(tmp_path)
        assert cache.speedup(_layer(), _layer()).source == "measured"
        cache.save()
        entries = json.loads(path.read_text())["entries"]
        assert len(entries) == 1 and next(iter(entries.values()))["speedup"] == 1.5


def test_a_folder_that_cannot_be_written_costs_only_persistence(tmp_path, timed):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a folder under a file cannot be made, even by root
    cache = TimingCache(blocked / "cache")
    assert cache.speedup(_layer(), _layer()).speedup == 1.5
    cache.save()  # no error
    assert cache.speedup(_layer(), _layer()).source == "cache"  # still remembered in the run


def test_an_empty_cache_dir_variable_keeps_timings_in_memory(tmp_path, timed, monkeypatch):
    monkeypatch.setenv(timing_cache.ENV, "")
    cache = TimingCache()
    assert cache.path is None
    cache.speedup(_layer(), _layer())
    cache.save()
    assert "memory only" in cache.note()
    monkeypatch.setenv(timing_cache.ENV, str(tmp_path))
    assert TimingCache().path == tmp_path / timing_cache.FILE_NAME


def test_the_file_keeps_the_most_recently_used_entries(tmp_path, timed, monkeypatch):
    monkeypatch.setattr(timing_cache, "MAX_ENTRIES", 2)
    for spatial in ((5, 5), (6, 6), (7, 7)):
        cache = TimingCache(tmp_path)
        cache.speedup(_layer(spatial=spatial), _layer(spatial=spatial))
        cache.save()
    assert len(json.loads((tmp_path / timing_cache.FILE_NAME).read_text())["entries"]) == 2
    cache = TimingCache(tmp_path)
    assert cache.speedup(_layer(spatial=(5, 5)), _layer(spatial=(5, 5))).source == "measured"
    assert cache.speedup(_layer(spatial=(7, 7)), _layer(spatial=(7, 7))).source == "cache"
