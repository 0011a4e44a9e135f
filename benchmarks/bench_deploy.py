"""File sizes of a model in each deployment format: GGUF (Q8_0, Q4_0, Q4_1), GPTQ and
compressed-tensors pack-quantized, beside the float checkpoint and our packed format.

Every quantized output comes from `surgery quantize --method rtn` (its library call) at 8-bit
symmetric, 4-bit symmetric and 4-bit asymmetric weights in groups of 32 (the three GGUF block
types), with embeddings and the output head kept float (the default) and the rows that 32 does not
divide kept float too (the char LLaMA's 176-wide down_proj). The "max abs dW" column is the largest
difference between the weights the format stores and those our quantizer produced (0: written
exactly; the quantizer learns on the format's fp16 scales).

  python benchmarks/bench_deploy.py            # the char LLaMA fixture (seconds)
  python benchmarks/bench_deploy.py --large    # also a 1.7 GB LLaMA-shaped random fp16 model, converted
                                               # from one packed run per scheme (convert_packed)
  python benchmarks/bench_deploy.py --large --large-schemes "4-bit sym g32"   # one scheme of it
  python benchmarks/bench_deploy.py --large --workdir /tmp/bd   # keep (and reuse) the model and packed runs

With --large every step runs in a fresh process of its own, and its seconds and peak resident memory
(VmHWM) are that process's alone; "at start" is the peak before the step ran (Python, torch and
modelsurgery imported), so the step's own memory is the difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("modelsurgery") is None:  # an installed (or PYTHONPATH) modelsurgery comes first
    sys.path.insert(0, str(ROOT))

from modelsurgery.checkpoint import PlannedTensor, Provenance, write_checkpoint
from modelsurgery.deploy import convert_packed
from modelsurgery.ops.quantize.operation import QuantizeOptions, quantize_checkpoint

LLAMA = ROOT / "fixtures" / "charlm" / "llama"
#: (label, bits, symmetric, GGUF block type)
SCHEMES = [("8-bit sym g32", 8, True, "Q8_0"), ("4-bit sym g32", 4, True, "Q4_0"), ("4-bit asym g32", 4, False, "Q4_1")]
FORMATS = ["packed", "gptq", "compressed-tensors", "gguf"]


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors shards or the GGUF file), not config or tokenizer."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".gguf"))


def options(bits: int, symmetric: bool, fmt: str, skip: list[str]) -> QuantizeOptions:
    return QuantizeOptions(bits=bits, method="rtn", granularity="group", group_size=32, symmetric=symmetric,
                           format=fmt, skip=skip, gguf_tokenizer="none", force=True)


def output_name(work: Path, fmt: str, label: str) -> Path:
    stem = label.replace(" ", "-")
    return work / (f"{stem}.gguf" if fmt == "gguf" else f"{stem}-{fmt}")


def bench_direct(model: Path, work: Path, skip: list[str]) -> list[dict]:
    """One `surgery quantize --format FMT` run per scheme and format."""
    rows = []
    for label, bits, sym, block in SCHEMES:
        for fmt in FORMATS:
            out = output_name(work, fmt, label)
            start = time.perf_counter()
            result = quantize_checkpoint(model, out, options(bits, sym, fmt, skip))
            rows.append({"scheme": label, "format": fmt if fmt != "gguf" else f"gguf {block}",
                         "bytes": weight_bytes(out), "seconds": time.perf_counter() - start,
                         "max_dw": result.deploy["max_scale_rounding_error"] if result.deploy else None})
    return rows


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (ru_maxrss keeps the forking parent's peak
    across exec, so a fresh process would report the benchmark's own)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def _measured(fn, args):
    start_rss, start = _peak_rss(), time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start, start_rss, _peak_rss()


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new process: (result, seconds, peak RSS at start, peak RSS at the end)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (fn, args))


def _quantize_packed(model: Path, out: Path, bits: int, sym: bool, skip: list[str]) -> None:
    quantize_checkpoint(model, out, options(bits, sym, "packed", skip))


def _copy(packed: Path, out: Path) -> None:
    shutil.copytree(packed, out, dirs_exist_ok=True)


def _convert(packed: Path, out: Path, fmt: str) -> float:
    return convert_packed(packed, out, fmt, force=True, gguf_tokenizer="none").max_scale_rounding_error


def bench_converted(model: Path, work: Path, skip: list[str], schemes: list[str]) -> list[dict]:
    """One packed run per scheme (reused when ``work`` already holds it), converted to each deployment
    format (convert_packed); each step in a fresh process."""
    rows = []
    for label, bits, sym, block in SCHEMES:
        if label not in schemes:
            continue
        packed = output_name(work, "packed", label)
        if packed.exists():
            row = {"seconds": None, "rss_start": None, "rss_peak": None, "max_dw": None}
        else:
            _, seconds, rss_start, rss_peak = in_fresh_process(_quantize_packed, model, packed, bits, sym, skip)
            row = {"seconds": seconds, "rss_start": rss_start, "rss_peak": rss_peak, "max_dw": None}
        rows.append({"scheme": label, "format": "packed", "bytes": weight_bytes(packed), **row})
        copy = work / f"{packed.name}-copy"  # the baseline: copying the packed files as they are
        _, seconds, rss_start, rss_peak = in_fresh_process(_copy, packed, copy)
        rows.append({"scheme": label, "format": "(copy of the packed folder)", "bytes": weight_bytes(copy),
                     "seconds": seconds, "rss_start": rss_start, "rss_peak": rss_peak, "max_dw": None})
        shutil.rmtree(copy)
        for fmt in FORMATS[1:]:
            out = output_name(work, fmt, label)
            max_dw, seconds, rss_start, rss_peak = in_fresh_process(_convert, packed, out, fmt)
            rows.append({"scheme": label, "format": fmt if fmt != "gguf" else f"gguf {block}",
                         "bytes": weight_bytes(out), "seconds": seconds, "rss_start": rss_start,
                         "rss_peak": rss_peak, "max_dw": max_dw})
    return rows


def large_llama(folder: Path) -> Path:
    """A LLaMA-shaped fp16 model of about 1.7 GB (hidden 2048, 16 layers, 32 heads / 4 KV heads,
    MLP 5632, vocab 32000) with random weights, written tensor by tensor."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
           "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 4,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32000,
           "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "silu"}
    h, f, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // 32 * 4
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    def tensor(index: int, shape: tuple[int, ...]):
        def load() -> torch.Tensor:  # generated when written: one tensor in memory at a time
            if len(shape) == 1:
                return torch.ones(shape, dtype=torch.float16)
            gen = torch.Generator().manual_seed(index)
            return (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        return load

    planned = [PlannedTensor(n, s, torch.float16, tensor(i, s)) for i, (n, s) in enumerate(shapes.items())]
    write_checkpoint(folder, planned, provenance=Provenance("bench_deploy", {}, []), config=cfg)
    return folder


def print_table(title: str, float_bytes: int, rows: list[dict]) -> None:
    print(f"\n{title}: float checkpoint {float_bytes / 2**20:.3f} MiB")
    memory = any("rss_peak" in r for r in rows)
    print("| scheme | format | weight files MiB | of float | max abs dW | seconds |"
          + (" peak RSS GiB (at start) |" if memory else ""))
    print("|---|---|---|---|---|---|" + ("---|" if memory else ""))
    for r in rows:
        line = (f"| {r['scheme']} | {r['format']} | {r['bytes'] / 2**20:.3f} | {r['bytes'] / float_bytes:.1%} | "
                f"{'' if r['max_dw'] is None else format(r['max_dw'], '.1e')} | "
                f"{'reused' if r['seconds'] is None else format(r['seconds'], '.2f')} |")
        if memory:
            line += ("  |" if r.get("rss_peak") is None
                     else f" {r['rss_peak'] / 2**30:.2f} ({r['rss_start'] / 2**30:.2f}) |")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also the 1.7 GB LLaMA-shaped model (minutes)")
    parser.add_argument("--large-schemes", default=",".join(s[0] for s in SCHEMES),
                        help="with --large: which schemes, comma-separated (each costs minutes)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="with --large: keep the model and packed runs here and reuse them when present")
    parser.add_argument("--skip-small", action="store_true", help="with --large: leave out the char LLaMA runs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_small:
            (work / "charlm").mkdir()
            rows = bench_direct(LLAMA, work / "charlm", ["down_proj"])
            print_table("char LLaMA fixture (fixtures/charlm/llama)", weight_bytes(LLAMA), rows)
            results["charlm_llama"] = rows
        if args.large:
            large = args.workdir or work
            model = large / "large"
            if not (model / "config.json").exists():
                large_llama(model)
            (large / "large-out").mkdir(parents=True, exist_ok=True)
            rows = bench_converted(model, large / "large-out", [], args.large_schemes.split(","))
            print_table("LLaMA-shaped random fp16 model", weight_bytes(model), rows)
            results["large_llama"] = rows
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
