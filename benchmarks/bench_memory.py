"""Peak memory of every command that reads a large model: on bench_scale.py's random bf16 LLaMA-shaped
checkpoint (full size: hidden 2048, 16 layers, intermediate 5632, vocab 32000, 0.95B parameters, about
1.7 GB in two shards; ``--small``: hidden 256, 4 layers, about 11 MB), wall time and peak anonymous resident
memory (RssAnon summed over the process tree, polled every 20 ms; bench_scale.measure) of one run of each
command, beside the process start (Python importing torch and the CLI) measured in the same run.

The peak beyond the process start is also given in units of the largest tensor of the model in float32 (the
embedding, 32000 x 2048: 262 MB at full size). "streams" when it is at most 4 such tensors (a streaming
command holds a few working copies: a merge's inputs in float32, an SVD's factors, the tensor being written);
"the model's size or more" when it reaches the model's size in bf16; "more than 4 tensors" otherwise. Whether
a command holds the whole model or large temporaries of one tensor is read from its code (the README says which).

Inputs, generated once in --workdir and removed at the end: models A, B, C (bench_scale.generate, seeds 0,
1, 2); a fine-tune T = A + noise (std 1e-3) on every matrix; a rank-16 LoRA adapter on q_proj/v_proj in
PEFT's own file format (adapter_config.json + adapter_model.safetensors, the names and shapes
``peft.get_peft_model`` saves); A quantized RTN 4-bit packed, GPTQ and compressed-tensors (the rows that
read them follow); mergekit configs (linear of A, B, C; a passthrough of A's layers 0-8 and B's 4-12).
``export`` builds the whole torch module and traces it (ONNX export is whole-model by nature): it runs on
the --small model only.

    python benchmarks/bench_memory.py [--small] [--workdir /tmp] [--only merge-linear,fold ...] [--threads 1]
    python benchmarks/bench_memory.py --list   # the rows
    git worktree add /tmp/old REV  # then rows of that commit beside this code's, each right after the other:
    python benchmarks/bench_memory.py --only quantize-gguf --baseline /tmp/old

Only the models the selected rows read are generated (B and C for the merges and mergekit runs).

``analyze`` runs on two full-width models of 2 blocks (its weight matching and per-matrix decompositions grow with
the depth, its memory does not once it streams; 2 blocks keep the row to minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import FULL, SMALL, measure

SURGERY = [sys.executable, "-m", "modelsurgery"]


def generate_tuned(base: Path, folder: Path, std: float = 1e-3, seed: int = 3) -> None:
    """A fine-tune of ``base``: every matrix plus Gaussian noise, norms unchanged; tensor by tensor."""
    import torch

    from modelsurgery.checkpoint import Checkpoint, PlannedTensor, write_checkpoint

    ckpt = Checkpoint.open(base)
    gen = torch.Generator().manual_seed(seed)

    def tuned(name: str) -> torch.Tensor:
        t = ckpt.get(name)
        if t.dim() < 2:
            return t
        return (t.float() + std * torch.randn(t.shape, generator=gen)).to(t.dtype)

    write_checkpoint(folder, [PlannedTensor(n, i.shape, i.dtype, lambda n=n: tuned(n)) for n, i in ckpt.infos.items()],
                     config=ckpt.config, max_shard_size=ckpt.nbytes // 2 + 2**28)


def generate_lora(base: Path, folder: Path, rank: int = 16, seed: int = 4) -> None:
    """A LoRA adapter in PEFT's file format (``get_peft_model(model, LoraConfig(r, target_modules=[q, v]))``
    then ``save_pretrained``): tensors ``base_model.model.<module>.lora_A.weight`` (r x in) and ``lora_B``
    (out x r), float32, B non-zero as after training."""
    import torch
    from safetensors.torch import save_file

    from modelsurgery.checkpoint import Checkpoint

    ckpt = Checkpoint.open(base)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, info in ckpt.infos.items():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            module = "base_model.model." + name[: -len(".weight")]
            out_f, in_f = info.shape
            tensors[module + ".lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[module + ".lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 1e-3
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None}))


def mergekit_configs(work: Path, layers: int) -> None:
    a, b, c = (work / m for m in "abc")
    (work / "linear.yml").write_text(
        "merge_method: linear\ndtype: bfloat16\nmodels:\n"
        + "".join(f"  - model: {m}\n    parameters:\n      weight: {w}\n" for m, w in ((a, 0.5), (b, 0.3), (c, 0.2))))
    half = layers // 2
    (work / "passthrough.yml").write_text(
        "merge_method: passthrough\ndtype: bfloat16\nslices:\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [0, {half}]\n"
        f"  - sources:\n      - model: {b}\n        layer_range: [{half // 2}, {half + half // 2}]\n")


#: a dequantize row -> the quantize row whose output it reads
READS = {"dequantize": "quantize-packed", "dequantize-gptq": "quantize-gptq",
         "dequantize-compressed-tensors": "quantize-compressed-tensors"}


def rows(work: Path, shape: dict, small_model: Path) -> dict[str, list[str]]:
    """Row name -> command line (outputs under work/out-NAME)."""
    a, b, c, t = (str(work / m) for m in "abct")
    o = {}
    q = ["quantize", a, "--method", "rtn", "--bits", "4"]
    table = {
        "inspect": ["inspect", a],
        "analyze (2 layers)": ["analyze", str(work / "a2"), str(work / "b2")],
        "merge-linear": ["merge", a, b, c, "--method", "linear", "--no-align"],
        "merge-slerp": ["merge", a, b, "--method", "slerp", "--no-align"],
        "merge-task-arithmetic": ["merge", b, c, "--base", a, "--method", "task-arithmetic", "--no-align"],
        "merge-ties": ["merge", b, c, "--base", a, "--method", "ties", "--no-align"],
        "run-linear": ["run", str(work / "linear.yml")],
        "run-passthrough": ["run", str(work / "passthrough.yml")],
        "grow-stack": ["grow", a, "--method", "stack", "--factor", "2"],
        "grow-width": ["grow", a, "--method", "width", "--factor", "1.25"],
        "quantize-packed": [*q, "--format", "packed"],
        "dequantize": ["dequantize", str(work / "out-quantize-packed")],
        "fold": ["fold", a, str(work / "lora")],
        "extract": ["extract", a, t, "--rank", "16"],
        "quantize-gguf": [*q, "--format", "gguf", "--gguf-tokenizer", "none", "--granularity", "group",
                          "--group-size", "32"],
        "quantize-gptq": [*q, "--format", "gptq"],
        "dequantize-gptq": ["dequantize", str(work / "out-quantize-gptq")],
        "quantize-compressed-tensors": [*q, "--format", "compressed-tensors"],
        "dequantize-compressed-tensors": ["dequantize", str(work / "out-quantize-compressed-tensors")],
        "align": ["align", a, "--old-classes", str(shape["vocab"] // 2)],
        "export (--small model)": ["export", str(small_model), "--check"],
    }
    for name, cmd in table.items():
        out = work / ("out-" + name.split()[0])
        if name == "quantize-gguf":
            out = out.with_suffix(".gguf")
        elif name.startswith("export"):
            out = out.with_suffix(".onnx")
        reads = name.split()[0] in ("inspect", "analyze")  # writes nothing
        o[name] = [*SURGERY, *cmd, *([] if reads else ["-o", str(out)]),
                   *([] if name.startswith("export") or reads else ["--force"]), *(["--json"] if reads else ["-q"])]
    return o


def with_code(cmd: list[str], code: Path) -> list[str]:
    """``cmd`` (``python -m modelsurgery ...``) run with the modelsurgery of the checkout ``code``, ahead of any
    on the path (a checkout in the working directory included)."""
    i = cmd.index("-m")
    return [cmd[0], "-c", f"import sys, runpy; sys.path.insert(0, {str(code.resolve())!r}); "
            "runpy.run_module('modelsurgery', run_name='__main__', alter_sys=True)", *cmd[i + 2:]]


def verdict(peak_mb: float, start_mb: float, largest_mb: float, model_mb: float) -> tuple[float, str]:
    """(the peak beyond the process start, in largest float32 tensors; what that says)."""
    tensors = (peak_mb - start_mb) / largest_mb
    if tensors <= 4:
        return tensors, "streams"
    if peak_mb - start_mb >= model_mb:
        return tensors, "the model's size or more"
    return tensors, "more than 4 tensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="hidden 256, 4 layers (quick check)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--only", help="comma-separated row names (default: every row; --list shows them)")
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--threads", type=int, help="torch threads in each measured run (OMP_NUM_THREADS)")
    ap.add_argument("--keep", action="store_true", help="leave the work folder (printed) in place")
    ap.add_argument("--baseline", type=Path, help="a checkout of other code (say, an older commit): every selected "
                    "row is also run with it (PYTHONPATH), just before this code's")
    args = ap.parse_args()
    shape = SMALL if args.small else FULL
    names = list(rows(Path("w"), shape, Path("s")))
    if args.list:
        print("\n".join(names))
        return
    only = names if not args.only else [n for n in names if n.split()[0] in args.only.split(",")]
    if args.only and not only:
        raise SystemExit(f"--only {args.only}: no such row (--list shows them)")
    for reader, row in READS.items():
        if reader in only and row not in only:
            only.insert(only.index(reader), row)
    work = Path(tempfile.mkdtemp(prefix="bench_memory-", dir=args.workdir))
    here = str(Path(__file__).resolve().parent)
    py = sys.executable

    def child(code: str) -> None:
        subprocess.run([py, "-c", f"import sys; sys.path.insert(0, {here!r}); from pathlib import Path; "
                        f"from bench_scale import *; from bench_memory import *; {code}"], check=True)

    reads = {arg for n, cmd in rows(work, shape, work / "small").items() if n in only for arg in cmd}
    try:
        for name, seed in (("a", 0), ("b", 1), ("c", 2)):
            if name != "a" and str(work / name) not in reads and not any(n.startswith("run") for n in only):
                continue  # B and C: read by the merges and the mergekit configs only
            child(f"generate(Path({str(work / name)!r}), {'SMALL' if args.small else 'FULL'}, {seed})")
        if "extract" in only:
            child(f"generate_tuned(Path({str(work / 'a')!r}), Path({str(work / 't')!r}))")
        if "fold" in only:
            child(f"generate_lora(Path({str(work / 'a')!r}), Path({str(work / 'lora')!r}))")
        # analyze: full width, 2 blocks (time grows with the depth, memory does not)
        if any(n.startswith("analyze") for n in only):
            for name, seed in (("a2", 0), ("b2", 1)):
                child(f"generate(Path({str(work / name)!r}), {{**{'SMALL' if args.small else 'FULL'}, 'layers': 2}}, "
                      f"{seed})")
        small_model = work / "small"
        if any(n.startswith("export") for n in only):
            child(f"generate(Path({str(small_model)!r}), SMALL, 0)")
        mergekit_configs(work, shape["layers"])
        model_mb = sum(f.stat().st_size for f in (work / "a").glob("*.safetensors")) / 2**20
        largest_mb = shape["vocab"] * shape["hidden"] * 4 / 2**20
        start = measure([py, "-c", "import torch, modelsurgery.cli.app"], args.threads)
        print(f"process start: {start}", file=sys.stderr, flush=True)
        results = {}
        # the baseline's run of a row first, this code's after it (whose outputs the reading rows then read)
        labelled = [(name, with_code(cmd, args.baseline) if base else cmd, base)
                    for name, cmd in rows(work, shape, small_model).items() if name in only
                    for base in ([True] if args.baseline else []) + [False]]
        for name, cmd, base in labelled:
            label = name + (" (baseline)" if base else "")
            try:
                r = measure(cmd, args.threads)
            except SystemExit as e:  # a failing command is a row of the table, not the end of the run
                print(f"{label}: {e}", file=sys.stderr, flush=True)
                results[label] = {"peak_anon_mb": float("nan"), "seconds": float("nan"), "tensors": float("nan"),
                                  "verdict": "failed"}
                continue
            r["tensors"], r["verdict"] = verdict(r["peak_anon_mb"], start["peak_anon_mb"], largest_mb, model_mb)
            print(f"{label}: {r}", file=sys.stderr, flush=True)
            results[label] = r
            if base:
                continue
            done = [name.split()[0]]
            if name.startswith("dequantize"):  # its input, a quantize row's output, is read now
                done.append(READS[name])
            for row in done if name not in READS.values() else ():
                for p in work.glob(f"out-{row}*"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(json.dumps({"model": shape, "checkpoint_mb": round(model_mb, 1), "largest_float32_mb": largest_mb,
                          "threads": args.threads, "baseline": str(args.baseline) if args.baseline else None,
                          "process_start": start, "runs": results}, indent=1))
        print(f"\nprocess start: {start['peak_anon_mb']:.0f} MB; largest tensor in float32: {largest_mb:.0f} MB; "
              f"model: {model_mb:.0f} MB bf16\n")
        print("| command | peak RssAnon MB | beyond the start, in largest tensors | wall s | verdict |\n"
              "|---|---:|---:|---:|---|")
        for name, r in results.items():
            print(f"| {name} | {r['peak_anon_mb']:.0f} | {r['tensors']:.1f} | {r['seconds']:.1f} | {r['verdict']} |")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
