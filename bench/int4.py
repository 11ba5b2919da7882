"""int4 weight-only: every form side by side with float, on a real OCR model and a sentence encoder.

    python bench/int4.py [--runs 30] [--rounds 3] [--only rec,encoder] [--threads N] [--shapes]

Models: ppocrv4_rec (real, 9 constant MatMuls in its SVTR blocks and CTC head, input
[1,3,48,320], fidelity on rendered text lines: CTC-decoded text agreement with the float model
and the logits' rel L2) and a BERT-like sentence encoder built with onnx.helper from random
weights (``fixtures/transformer.py``: vocab 30,000 x 384 word embedding read by Gather, 6
layers of 384x384 attention and 384x1536 feed-forward MatMuls, 128 tokens; fidelity: cosine of
the sentence embeddings, and the Spearman correlation of the pairwise similarities of 16
"sentences" with the float model's, the figure a sentence-embedding user checks).

Each row: the layers per form, rewritten weights' bytes before/after, the whole file's bytes
before/after, fidelity, and latency over float's, measured side by side in one process
(interleaved runs; the median ratio of ``--rounds`` rounds and their range; < 1 is faster).
The "before" rows are this pass as it was: blocked DequantizeLinear at block 32
(``form=dq,gather=false``), and MatMulNBits with no accuracy level.

``--shapes`` prints the table behind the size rule of ``form=auto`` instead: one MatMul alone,
float against MatMulNBits (accuracy_level 4) at each block size, by shape and activation rows.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.mnist import default_real_dir  # noqa: E402
from fixtures.transformer import token_feeds, transformer_model  # noqa: E402

BEFORE = [
    ("before: int4 (default)", "int4:form=dq,block_size=32,gather=false"),
    (
        "before: int4:matmulnbits=true",
        "int4:form=matmulnbits,block_size=32,accuracy_level=0,gather=false",
    ),
]
AFTER = [
    "int4",
    "int4:block_size=128",
    "int4:form=matmulnbits",
    "int4:form=matmulnbits,block_size=128",
    "int4:form=folded",
    "int4:form=dq",
    "int4:block_size=128,min_speedup=1",
]
VOCAB, TOKENS = 30000, 128
REC_DIMS = {"p2o.DynamicDimension.0": 1, "x:2": 48, "p2o.DynamicDimension.1": 320}
_WORDS = ["invoice", "total", "amount", "date", "2024", "street", "north", "station", "coffee"]


def text_lines(count: int, seed: int = 0) -> np.ndarray:
    """Rendered text lines for ppocrv4_rec, [count, 3, 48, 320], scaled to [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    lines = np.empty((count, 3, 48, 320), np.float32)
    for i in range(count):
        line = Image.new("RGB", (320, 48), tuple(int(v) for v in rng.integers(200, 256, 3)))
        font = ImageFont.load_default(size=int(rng.integers(22, 32)))
        words = " ".join(rng.choice(_WORDS, int(rng.integers(1, 4))))
        ImageDraw.Draw(line).text(
            (int(rng.integers(2, 30)), 8), words, fill=(20, 20, 20), font=font
        )
        lines[i] = np.asarray(line, np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return lines


def ctc_decode(logits: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC: argmax per step, repeats merged, blanks (class 0) dropped."""
    texts = []
    for steps in logits.argmax(-1):
        merged = [c for j, c in enumerate(steps) if c != 0 and (j == 0 or c != steps[j - 1])]
        texts.append(tuple(int(c) for c in merged))
    return texts


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(v)).astype(np.float64) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def pairwise_cosines(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    return similarity[np.triu_indices(len(unit), 1)]


class Case:
    """A model, its feeds, and its fidelity measure against the float model."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "rec":
            self.source = str(default_real_dir() / "ppocrv4_rec.onnx")
            lines = text_lines(16, seed=5)
            self.feeds = [{"x": lines[i : i + 1]} for i in range(16)]
            self.dims = REC_DIMS
        else:
            self.source = transformer_model(vocab=VOCAB)
            self.feeds = token_feeds(VOCAB, 16, 1, TOKENS, seed=7)
            self.dims = None
        self.label = {"rec": "ppocrv4_rec", "encoder": "encoder (random)"}[name]

    def outputs(self, runner) -> np.ndarray:
        return np.concatenate([runner.run(feed)[0] for feed in self.feeds])

    def fidelity(self, reference: np.ndarray, candidate: np.ndarray) -> str:
        rel = np.linalg.norm(candidate - reference) / np.linalg.norm(reference)
        if self.name == "rec":
            same = np.mean([a == b for a, b in zip(ctc_decode(reference), ctc_decode(candidate))])
            return f"text agree {same:.3f}, relL2 {rel:.4f}"
        cosine = np.sum(reference * candidate, 1) / (
            np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
        )
        rho = spearman(pairwise_cosines(reference), pairwise_cosines(candidate))
        return f"cos {cosine.mean():.4f}, spearman {rho:.4f}, relL2 {rel:.4f}"


def model_bytes(model) -> int:
    import onnx
    import onnx_ir as ir

    if isinstance(model, bytes):
        return len(model)
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return proto.ByteSize()


def bench_case(case: Case, runs: int, rounds: int, threads: int | None) -> list[list[str]]:
    import onnx

    from onnxcompress import Options, compress
    from onnxcompress.validate import Runner, measure_latency

    source = case.source if isinstance(case.source, str) else case.source.SerializeToString()
    original = onnx.load(case.source) if isinstance(case.source, str) else case.source
    reference = Runner(source, "float", threads=threads)
    expected = case.outputs(reference)
    rows = [[case.label, "float", "-", "-", "-", case.fidelity(expected, expected), "1.00"]]
    for label, setting in [*BEFORE, *((s, s) for s in AFTER)]:
        options = Options(validate=False, dims=case.dims)
        model, report = compress(source, [setting], case.feeds[:2], options=options)
        layers = [layer for layer in report.passes[0].layers if layer.action == "rewritten"]
        forms = collections.Counter(layer.detail["form"] for layer in layers)
        before = sum(layer.bytes_before for layer in layers)
        after = sum(layer.bytes_after for layer in layers)
        candidate = Runner(model, "int4", threads=threads)
        fidelity = case.fidelity(expected, case.outputs(candidate))
        ratios = []
        for _ in range(rounds):  # the machine's other load comes and goes: several rounds
            float_ms, int4_ms = measure_latency([reference, candidate], case.feeds[0], runs)
            ratios.append(int4_ms / float_ms)
        rows.append(
            [
                case.label,
                label,
                ", ".join(f"{n} {form}" for form, n in sorted(forms.items())),
                f"{before / max(after, 1):.2f}x",
                f"{model_bytes(original) / model_bytes(model):.2f}x",
                fidelity,
                f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
            ]
        )
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        candidate.close()
    reference.close()
    return rows


def shapes_table(runs: int, threads: int | None) -> list[list[str]]:
    """float MatMul against MatMulNBits (accuracy_level 4) alone, by shape, rows and block."""
    from onnxcompress.passes.quant.int4_forms import nbits_model
    from onnxcompress.passes.quant.int4_pack import quantize_blocks
    from onnxcompress.validate import Runner, measure_latency

    rng = np.random.default_rng(0)
    rows = []
    for k, n in [(120, 360), (240, 120), (120, 6625), (256, 1024), (384, 256), (384, 384),
                 (384, 1536), (512, 256), (1024, 256), (1536, 384), (3072, 768)]:  # fmt: skip
        weight = rng.standard_normal((k, n)).astype(np.float32)
        for m in (1, 16, 128):
            shape = [1, m, k]
            models = [_float_matmul(weight, shape)] + [
                nbits_model(shape, quantize_blocks(weight, block, True), None, 4, {"": 17})
                for block in (16, 32, 64, 128, 256)
            ]
            runners = [Runner(model, "layer", threads=threads) for model in models]
            feed = {"x": rng.standard_normal(shape).astype(np.float32)}
            times = measure_latency(runners, feed, runs)
            rows.append([f"{k}x{n}", str(m), f"{times[0] * 1000:.0f}"]
                        + [f"{t / times[0]:.2f}" for t in times[1:]])  # fmt: skip
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            for runner in runners:
                runner.close()
    return rows


def _float_matmul(weight: np.ndarray, shape: list[int]):
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.Tensor(weight, name="w"))
    node = ir.node("MatMul", [x, w])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=10)


def main() -> None:
    from onnxcompress.report import table

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (median, range)")
    parser.add_argument("--only", default="rec,encoder", help="models: rec, encoder")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    parser.add_argument("--shapes", action="store_true", help="the size rule's table instead")
    args = parser.parse_args()
    if args.shapes:
        header = ["KxN", "rows", "float us", "b16", "b32", "b64", "b128", "b256"]
        print("\n".join(table(header, shapes_table(args.runs, args.threads))))
        return
    rows = []
    for name in args.only.split(","):
        rows += bench_case(Case(name), args.runs, args.rounds, args.threads)
    header = ["model", "setting", "layers", "weights", "file", "fidelity", "latency"]
    print("\n".join(table(header, rows)))


if __name__ == "__main__":
    main()
