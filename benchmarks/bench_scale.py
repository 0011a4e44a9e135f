"""Quantize and merge at LLM scale: on a random bf16 LLaMA-shaped checkpoint (full size: hidden 2048,
16 layers, intermediate 5632, vocab 32000, about 1.7 GB in two shards), wall time and peak anonymous
resident memory (RssAnon summed over the process tree, polled every 20 ms: heap and anonymous
mappings, not the file-backed pages of memory-mapped inputs) of

- a plain copy of the checkpoint's bytes (the floor for anything that reads and writes them);
- RTN 4-bit packed, streaming (the default) and --whole-model (the float model built first),
  streaming with --no-input-hash (the share of the provenance's SHA-256 of the inputs), and the
  process start alone (Python importing torch and the quantize command);
- FlexRound 4-bit packed with a few steps on random token ids, streaming and --whole-model;
- a match-merge of two such models (``surgery merge --method match``; max_iter 1), streaming weight
  matching (the default) and the in-memory matching (``weight_matching(streaming=False)``).

Each run is its own child process, side by side in the same run; ``--repeat N`` runs every row N
times, interleaved, and reports the best and the median (a copy's time on a shared disk varies
several-fold from run to run); ``--baseline DIR`` also runs the RTN streaming rows with the code
checked out in DIR, interleaved with this code's; ``--cold`` empties the page cache before every run
(root only), so the checkpoint, torch and Python's own files are read from the disk as on a first run.
``--small`` uses a model of hidden 256, 4 layers, intermediate 704,
vocab 4000 (about 11 MB) for a quick check.

    python benchmarks/bench_scale.py [--small] [--workdir /tmp] [--steps 2] [--skip-merge] [--repeat 5]
    python benchmarks/bench_scale.py --only rtn --bits 3 --group-size 128 --asymmetric
    git worktree add /tmp/old REV  # then the RTN rows of that commit beside this code's:
    python benchmarks/bench_scale.py --only rtn --repeat 5 --skip-whole --baseline /tmp/old
    python benchmarks/bench_scale.py --formula   # the memory formula at 1.7 GB, 7B and 70B (no runs)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = {"hidden": 2048, "layers": 16, "inner": 5632, "vocab": 32000, "heads": 16}
SMALL = {"hidden": 256, "layers": 4, "inner": 704, "vocab": 4000, "heads": 4}


def generate(folder: Path, shape: dict, seed: int) -> None:
    """The checkpoint in two shards, each tensor generated when the writer reaches it."""
    import torch

    from modelsurgery.checkpoint import PlannedTensor, write_checkpoint

    h, inner, vocab = shape["hidden"], shape["inner"], shape["vocab"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inner, h), p + "mlp.up_proj.weight": (inner, h),
                       p + "mlp.down_proj.weight": (h, inner)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    gen = torch.Generator().manual_seed(seed)

    def make(name, s):
        if name.endswith("norm.weight"):
            return torch.ones(s, dtype=torch.bfloat16)
        return (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)

    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inner, "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
              "num_key_value_heads": shape["heads"], "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    write_checkpoint(folder, [PlannedTensor(n, s, torch.bfloat16, lambda n=n, s=s: make(n, s))
                              for n, s in shapes.items()],
                     config=config, max_shard_size=total // 2 + vocab * h * 2)  # two shards: the head fits


def _tree(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], threads: int | None = None, extra_env: dict | None = None) -> dict:
    """Wall seconds, CPU seconds (user + system of the process and the children it waited for: steadier
    than wall time on a shared machine) and peak RssAnon (MB) of the process tree of ``cmd`` (torch
    limited to ``threads``)."""
    env = {**os.environ, **(extra_env or {})}
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, sum(_anon_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_anon_mb": round(peak / 1024, 1)}


def drop_page_cache() -> None:
    """Write dirty pages back, then drop the clean ones (the kernel's page cache, dentries and inodes)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cold: cannot drop the page cache ({e}); run as root") from e


WHOLE_MATCH = """
import sys
from pathlib import Path
import modelsurgery.ops.merge.merge as m
inner = m.weight_matching
m.weight_matching = lambda *a, **k: inner(*a, **{**k, "streaming": False})
m.merge_checkpoints([Path(sys.argv[1]), Path(sys.argv[2])], Path(sys.argv[3]), m.MergeOptions(max_iter=1), force=True)
"""
STREAM_MATCH = WHOLE_MATCH.replace('{**k, "streaming": False}', "k")


#: LLaMA shapes for the extrapolation: hidden, intermediate, layers, vocab, key/value heads' width
SIZES = {"1.7 GB bench model": (2048, 5632, 16, 32000, 2048), "LLaMA-2 7B": (4096, 11008, 32, 32000, 4096),
         "LLaMA-2 70B": (8192, 28672, 80, 32000, 1024)}


def formula(samples: int = 128, seq_len: int = 128, threads: int = 1) -> None:
    """Memory by formula (GB), beyond the runtime's own ~0.2 GB (what the --small rows show):
    streaming FlexRound = 20 bytes per parameter of one block (float32 weight, S2, its gradient, Adam's
    two moments) + the cached activations (quantized input and float target: 2 x samples x seq_len x
    hidden x 4 bytes); streaming RTN = two packed outputs of the largest quantized tensor (an MLP
    matrix, half a byte per element at 4 bits: embeddings and head are kept float by default; the one
    being written and the next) + each rounding thread's rows (``streaming.RTN_CHUNK_ELEMENTS``
    elements, about 3 float32 copies of them);
    whole model = 4 bytes per parameter (the float32 model) + the same block state; streaming
    match-merge = the 256 MiB similarity cache + 3 x the largest tensor in float32; in-memory
    matching = 12 bytes per parameter (A, B and permuted B in float32)."""
    print(f"\n{'model':20} {'params':>8} {'RTN stream':>10} {'Flex stream':>11} {'Flex whole':>10} "
          f"{'match stream':>12} {'match in-mem':>12}   (GB, formula: --formula)")
    for name, (h, inner, layers, vocab, kv) in SIZES.items():
        block = 2 * h * h + 2 * h * kv + 3 * h * inner
        params = layers * block + 2 * vocab * h
        largest = max(vocab * h, h * inner)
        acts = 2 * samples * seq_len * h * 4
        flex = 20 * block + acts
        gb = 1e9
        rtn = 2 * h * inner / 2 + threads * 12 * 2**19
        print(f"{name:20} {params / 1e9:7.2f}B {rtn / gb:10.2f} {flex / gb:11.2f} "
              f"{(4 * params + flex) / gb:10.2f} {(2**28 + 12 * largest) / gb:12.2f} {12 * params / gb:12.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="hidden 256, 4 layers (quick check)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--steps", type=int, default=2, help="FlexRound steps per block")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--only", choices=["rtn", "flexround", "merge"], help="run the copy and this one only")
    ap.add_argument("--threads", type=int, help="torch threads in each measured run (OMP_NUM_THREADS)")
    ap.add_argument("--bits", type=int, default=4, help="bit width of the RTN and FlexRound runs")
    ap.add_argument("--group-size", type=int, help="groups of this size instead of per channel")
    ap.add_argument("--asymmetric", action="store_true", help="asymmetric grids (a zero point per row/group)")
    ap.add_argument("--repeat", type=int, default=1, help="run every row this many times, interleaved "
                    "(best and median reported)")
    ap.add_argument("--baseline", type=Path, help="a checkout of other code (say, an older commit): the RTN "
                    "streaming rows are also run with it (PYTHONPATH), interleaved with this code's")
    ap.add_argument("--skip-whole", action="store_true", help="leave out the whole-model RTN row")
    ap.add_argument("--cold", action="store_true", help="empty the page cache before every run (sync, then "
                    "/proc/sys/vm/drop_caches; needs root): the model read from the disk, as on a first run")
    ap.add_argument("--formula", action="store_true", help="only print the memory formula for 1.7 GB, 7B, 70B")
    args = ap.parse_args()
    if args.formula:
        formula(args.samples if args.samples != 8 else 128, threads=args.threads or 1)
        return
    shape = SMALL if args.small else FULL
    work = Path(tempfile.mkdtemp(prefix="bench_scale-", dir=args.workdir))
    py = sys.executable
    try:
        merging = not args.skip_merge and args.only in (None, "merge")
        for name, seed in (("a", 0), ("b", 1)) if merging else (("a", 0),):
            subprocess.run([py, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"from bench_scale import generate, {'SMALL' if args.small else 'FULL'} as S; "
                            f"from pathlib import Path; generate(Path({str(work / name)!r}), S, {seed})"], check=True)
        model = work / "a"
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        import torch

        calib = work / "calib.safetensors"
        from safetensors.torch import save_file

        save_file({"input_ids": torch.randint(shape["vocab"], (args.samples, args.seq_len),
                                              generator=torch.Generator().manual_seed(0))}, calib)
        runs: dict[str, list[dict]] = {}

        def run(label: str, cmd: list[str], extra_env: dict | None = None) -> None:
            if args.cold:
                drop_page_cache()
            row = measure(cmd, args.threads, extra_env)
            print(f"{label}: {row} <- {' '.join(cmd[:6])} ...", file=sys.stderr, flush=True)
            runs.setdefault(label, []).append(row)

        grid = (["--granularity", "group", "--group-size", str(args.group_size)] if args.group_size else []) + (
            ["--asymmetric"] if args.asymmetric else [])
        q = [py, "-m", "modelsurgery", "quantize", str(model), "--bits", str(args.bits), "--format", "packed",
             "--force", "-q", *grid]
        for _ in range(args.repeat):  # interleaved, so that each row meets the same state of the machine
            shutil.rmtree(work / "copy", ignore_errors=True)
            run("plain copy", [py, "-c", f"import shutil; shutil.copytree({str(model)!r}, {str(work / 'copy')!r})"])
            rtn_modes = ("streaming",) if args.skip_whole else ("streaming", "whole-model")
            for mode in rtn_modes if args.only in (None, "rtn") else ():
                run(f"rtn packed, {mode}", [*q, "-o", str(work / f"rtn-{mode}"), "--method", "rtn", f"--{mode}"])
            if args.baseline and args.only in (None, "rtn"):
                for flags in ([], ["--no-input-hash"]):
                    run(", ".join(["rtn packed, streaming", *flags]) + " (baseline)",
                        [*q, "-o", str(work / "rtn-baseline"), "--method", "rtn", *flags],
                        {"PYTHONPATH": str(args.baseline.resolve())})
            if args.only in (None, "rtn"):  # what RTN's process spends before it reads the checkpoint
                run("process start (the imports of quantize)",
                    [py, "-c", "import modelsurgery.cli.quantize, modelsurgery.ops.quantize.operation"])
            if args.only in (None, "rtn"):  # the share of the provenance's SHA-256 of the inputs
                run("rtn packed, streaming, --no-input-hash",
                    [*q, "-o", str(work / "rtn-nohash"), "--method", "rtn", "--no-input-hash"])
            for mode in ("streaming", "whole-model") if args.only in (None, "flexround") else ():
                run(f"flexround {args.steps} steps, {mode}",
                    [*q, "-o", str(work / f"flex-{mode}"), "--method", "flexround", "--calib", str(calib),
                     "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                     "--batch-size", str(min(4, args.samples)), f"--{mode}"])
            if not args.skip_merge and args.only in (None, "merge"):
                for mode, code in (("streaming", STREAM_MATCH), ("in-memory matching", WHOLE_MATCH)):
                    run(f"match-merge, {mode}", [py, "-c", code, str(work / "a"), str(work / "b"),
                                                 str(work / f"merge-{mode.split()[0]}")])
        rows = {k: {"seconds": [r["seconds"] for r in v], "best_seconds": min(r["seconds"] for r in v),
                    "median_seconds": statistics.median(r["seconds"] for r in v),
                    "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in v),
                    "peak_anon_mb": max(r["peak_anon_mb"] for r in v)} for k, v in runs.items()}
        print(json.dumps({"model": shape, "checkpoint_mb": round(size / 2**20, 1), "threads": args.threads,
                          "cold": args.cold, "baseline": str(args.baseline) if args.baseline else None,
                          "repeat": args.repeat, "runs": rows}, indent=1))
        print(f"\n{'run':50} {'best s':>8} {'median s':>9} {'median CPU s':>13} {'peak RssAnon MB':>16}")
        for k, v in rows.items():
            print(f"{k:50} {v['best_seconds']:8.2f} {v['median_seconds']:9.2f} {v['median_cpu_seconds']:13.2f} "
                  f"{v['peak_anon_mb']:16.1f}")
        copy = rows["plain copy"]
        for label in ("rtn packed, streaming", "rtn packed, streaming, --no-input-hash"):
            if label in rows:
                print(f"{label} / plain copy: {rows[label]['best_seconds'] / copy['best_seconds']:.2f}x (best), "
                      f"{rows[label]['median_seconds'] / copy['median_seconds']:.2f}x (median); "
                      f"checkpoint {size / 2**20:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
