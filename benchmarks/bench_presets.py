"""Benchmark `surgery quantize --preset fast|default|best`: quality against time for the learned methods.

Each preset sets the reconstruction steps, calibration samples and batch size (``PRESETS`` in
``modelsurgery/ops/quantize/params.py``); this script runs each one, with RTN (no data, no training) and the
float model as the baselines, and prints one table: the metric on held-out data, the block reconstruction error
relative to RTN, the samples the calibration file actually gave, the time estimate printed after the first
steps against the calibration time measured, and wall and CPU seconds.

- digits: the MLP, every layer quantized (the classifier too), 2 bits per channel (at 3 and 4 bits
  RTN already keeps the float accuracy within 0.4 points: README quantize table), accuracy on 599 held-out
  samples. Its calibration file holds 256 samples, so "best" (1024 asked) uses 256.
- charlm: the character-level GPT-2 and LLaMA fixtures, 4 bits per channel, blocks only (embeddings and head
  float), perplexity on charlm_eval. "fast" only by default: "default" (5000 FlexRound steps of batch 32 per
  block) would take about 20 CPU-minutes per model here (extrapolated from the README's 300-step char GPT-2 rows,
  70 CPU s); add them with --charlm-presets fast,default.

    python benchmarks/bench_presets.py --threads 1
    python benchmarks/bench_presets.py --only digits --methods flexround --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing the package
FIX = ROOT / "fixtures"

MODELS = {
    "digits": {"label": "digits MLP", "model": FIX / "digits/mlp_seed0.safetensors", "bits": 2,
               "calib": FIX / "data/digits_calib.safetensors", "eval": FIX / "data/digits_eval.safetensors",
               "seq_len": None, "default_skips": False, "metric": "accuracy"},
    "gpt2": {"label": "char GPT-2", "model": FIX / "charlm/gpt2", "bits": 4, "calib": FIX / "data/charlm_calib.txt",
             "eval": FIX / "data/charlm_eval.safetensors", "seq_len": 64, "default_skips": True,
             "metric": "perplexity"},
    "llama": {"label": "char LLaMA", "model": FIX / "charlm/llama", "bits": 4, "calib": FIX / "data/charlm_calib.txt",
              "eval": FIX / "data/charlm_eval.safetensors", "seq_len": 64, "default_skips": True,
              "metric": "perplexity"},
}


def float_metric(spec: dict) -> float:
    from modelsurgery.checkpoint import Checkpoint
    from modelsurgery.families import detect_family
    from modelsurgery.ops.evaluate import evaluate
    from modelsurgery.ops.quantize.operation import read_data

    ckpt = Checkpoint.open(spec["model"])
    family = detect_family(ckpt)
    model = family.build_module()
    data = read_data(Path(spec["eval"]), family, ckpt.folder, None, spec["seq_len"], model)
    return evaluate(model, family, data)[spec["metric"]]


def run(spec: dict, method: str, preset: str | None, out: Path) -> dict:
    """One quantization in this process; the figures of one table row."""
    from modelsurgery.ops.quantize import QuantizeOptions, quantize_checkpoint

    opts = QuantizeOptions(bits=spec["bits"], method=method, preset=preset, calib=spec["calib"], eval=spec["eval"],
                           seq_len=spec["seq_len"], default_skips=spec["default_skips"], force=True)
    start, cpu = time.perf_counter(), time.process_time()
    r = quantize_checkpoint(spec["model"], out, opts)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    trained = [b for b in r.blocks if b["loss"] is not None]
    rel = sum(b["loss"] for b in trained) / max(sum(b["rtn_loss"] for b in trained), 1e-12)
    return {"method": method, "preset": r.options.get("preset") or "-", "steps": r.options.get("steps"),
            "batch": r.options["batch_size"], "samples": r.options["samples_used"],
            "value": r.evaluation["quantized"][spec["metric"]], "rel": rel,
            "cosine": r.evaluation["agreement"]["cosine_mean"],
            "estimated": r.estimate["seconds"] if r.estimate else None,
            "calibration": sum(b["seconds"] for b in r.blocks), "wall": wall, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="digits,gpt2,llama")
    ap.add_argument("--methods", default="flexround,adaround")
    ap.add_argument("--presets", default="fast,default,best", help="presets run on digits")
    ap.add_argument("--charlm-presets", default="fast", help="presets run on the char LMs (gpt2, llama)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-presets-") as tmp:
        for name in args.only.split(","):
            spec = MODELS[name]
            presets = (args.presets if name == "digits" else args.charlm_presets).split(",")
            base = float_metric(spec)
            rows.append({"model": spec["label"], "method": "float", "value": base})
            print(f"{spec['label']}: float {spec['metric']} {base:.4f}", flush=True)
            runs = [("rtn", None)] + [(m, p) for m in args.methods.split(",") for p in presets]
            for method, preset in runs:
                row = {"model": spec["label"], **run(spec, method, preset, Path(tmp) / f"{name}-{method}-{preset}")}
                rows.append(row)
                print(f"  {method} {row['preset']}: {spec['metric']} {row['value']:.4f}, block error / RTN "
                      f"{row['rel']:.3f}, {row['wall']:.1f} s wall, {row['cpu']:.1f} s CPU", flush=True)
    print()
    print(table(rows, {s["label"]: s for s in MODELS.values()}))


def table(rows: list[dict], specs: dict[str, dict]) -> str:
    out = ["| model | bits | method | preset | steps | batch | samples used | metric | value | block error / RTN "
           "| output cosine | estimated s | calibration s | wall s | CPU s |", "|---" * 15 + "|"]
    for r in rows:
        spec = specs[r["model"]]
        if r["method"] == "float":
            out.append(f"| {r['model']} | float | - | - | - | - | - | {spec['metric']} | {r['value']:.4f} "
                       "| - | 1 | - | - | - | - |")
            continue
        est = f"{r['estimated']:.0f}" if r["estimated"] is not None else "-"
        out.append(f"| {r['model']} | {spec['bits']} | {r['method']} | {r['preset']} | {r['steps'] or '-'} | "
                   f"{r['batch']} | {r['samples']} | {spec['metric']} | {r['value']:.4f} | {r['rel']:.3f} | "
                   f"{r['cosine']:.4f} | {est} | "
                   f"{r['calibration']:.0f} | {r['wall']:.0f} | {r['cpu']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
