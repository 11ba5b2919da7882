"""Every command and every pass over the corpus of models that once broke the tool (issue 11).

Valid models: no exit 3 and no traceback; an output, when written, passes onnx's full check and
runs in onnxruntime; the input is unchanged. Malformed models: exit 2 with one line, nothing
written, the input unchanged. The outcome counts are printed (``pytest -s``)."""

from __future__ import annotations

from collections import Counter

import onnx

from tests import corpus
from tests.conftest import sha256
from tests.test_cli import assert_one_clear_line, invoke

PASSES = ["lowrank:rank=8", "lowrank:scheme=separable,rank=1", "int4", "codebook",
          "prune:ratio=0.3", "sparsity:ratio=0.5", "qdq"]  # fmt: skip


def _run_valid(tmp_path, name: str, model: onnx.ModelProto, outcomes: Counter) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    before = sha256(source)
    for setting in PASSES:
        out = tmp_path / "out.onnx"
        result = invoke("compress", source, "-o", out, "-p", setting)
        where = f"{name}, {setting}"
        assert result.exit_code in (0, 2), f"{where}: {result.output}"
        assert "Traceback" not in result.output, where
        if result.exit_code == 0:
            saved = onnx.load(out)
            onnx.checker.check_model(saved, full_check=True)
            metadata = {entry.key: entry.value for entry in saved.metadata_props}
            assert metadata.get(corpus.METADATA_KEY) == "kept", where
            out.unlink()
        else:
            assert_one_clear_line(result, 2)
            assert not out.exists(), where
        outcomes[f"valid, compress: exit {result.exit_code}"] += 1
    for args in (["inspect", source], ["validate", source, source]):
        result = invoke(*args)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        outcomes[f"valid, {args[0]}: exit 0"] += 1
    assert sha256(source) == before, f"{name}: the input changed"


def _run_malformed(tmp_path, name: str, data: bytes, fragment: str, outcomes: Counter) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(data)
    out = tmp_path / "out.onnx"
    commands = [
        ["compress", source, "-o", out, "-p", "lowrank:rank=8"],
        ["compress", source, "-o", out, "-p", "int4", "--no-validate"],
        ["inspect", source],
        ["validate", source, source],
    ]
    huge_but_valid = name == "input of 2**40"  # only synthetic data for it is impossible
    for args in commands:
        result = invoke(*args)
        if huge_but_valid:
            assert result.exit_code in (0, 2) and "Traceback" not in result.output
            outcomes[f"input of 2**40 (valid), {args[0]}: exit {result.exit_code}"] += 1
            continue
        assert_one_clear_line(result, 2, fragment)
        assert not out.exists(), f"{name}: {args[0]} wrote an output"
        outcomes[f"malformed, {args[0]}: exit 2"] += 1
    assert source.read_bytes() == data


def test_every_command_and_pass_over_the_corpus(tmp_path):
    outcomes: Counter = Counter()
    for name, model in corpus.valid_models().items():
        folder = tmp_path / f"valid-{len(outcomes)}-{abs(hash(name))}"
        folder.mkdir()
        _run_valid(folder, name, model, outcomes)
    for name, (data, fragment) in corpus.malformed_models().items():
        folder = tmp_path / f"malformed-{abs(hash(name))}"
        folder.mkdir()
        _run_malformed(folder, name, data, fragment, outcomes)
    cases = len(corpus.valid_models()) + len(corpus.malformed_models())
    print(f"\ncorpus: {cases} models, {sum(outcomes.values())} command runs")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome}: {count}")
    assert not any("exit 3" in outcome for outcome in outcomes)
