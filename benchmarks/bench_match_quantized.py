"""`surgery merge --method match` on two packed 4-bit checkpoints: how the float view feeds weight matching its
dequantized weights, each way measured in its own process in the same run (wall time, CPU time, peak RssAnon
summed over the process tree: bench_scale.measure), with the merged bytes compared between the ways.

Inputs: two random bf16 LLaMA-shaped models (bench_scale.generate, seeds 0 and 1; default hidden 1024, 4
layers, intermediate 2816, vocab 32000: 116M parameters), each quantized RTN 4-bit per channel to the packed
format (`surgery quantize --format packed`). Ways (the first three are this code with one piece swapped back,
by monkeypatching in the child process, so that they differ in that piece only):

- ``main``: before this change: both models dequantized up front (``state_dict``), and each ``get`` of a packed
  weight dequantizing it twice (``Mapping.__contains__`` read it to answer ``in``);
- ``up-front``: both models dequantized up front into memory, ``in`` fixed;
- ``every-lookup``: nothing kept: each lookup of weight matching dequantizes again (``--every-lookup``: slow);
- ``spill`` (this code): each packed weight dequantized once, at its first lookup, into a memory-mapped temporary
  file (``ops.float_input``).

    python benchmarks/bench_match_quantized.py [--hidden 1024 --layers 4 --inner 2816] [--every-lookup]
    python benchmarks/bench_match_quantized.py --small     # hidden 256: a quick check
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from bench_scale import SMALL, generate, measure

MERGE = """
import sys
from collections.abc import Mapping
from pathlib import Path
import modelsurgery.ops.float_input as fi
from modelsurgery.checkpoint import Checkpoint
from modelsurgery.checkpoint.store import LazyState
way = sys.argv[1]
if way in ("main", "up-front"):
    fi._FloatView.lazy_state = Checkpoint.state_dict
if way == "main":
    fi._Dequantized.__contains__ = Mapping.__contains__
if way == "every-lookup":
    fi._FloatView.lazy_state = lambda self: LazyState(self)
from modelsurgery.ops.merge.merge import MergeOptions, merge_checkpoints
a, b, out = map(Path, sys.argv[2:])
merge_checkpoints([a, b], out, MergeOptions(hash_inputs=False), force=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--inner", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--small", action="store_true", help="bench_scale's SMALL shape (hidden 256)")
    ap.add_argument("--every-lookup", action="store_true", help="also the way that keeps nothing (slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    shape = SMALL if args.small else {"hidden": args.hidden, "layers": args.layers, "inner": args.inner,
                                      "vocab": args.vocab, "heads": args.heads}
    work = Path(tempfile.mkdtemp(prefix="bench_match_quantized-", dir=args.workdir))
    py = sys.executable
    env = {"PYTHONPATH": str(HERE.parent)}  # this checkout's modelsurgery in every child
    try:
        packed = []
        for seed in (0, 1):
            generate(work / f"f{seed}", shape, seed)
            packed.append(work / f"p{seed}")
            subprocess.run([py, "-m", "modelsurgery", "quantize", str(work / f"f{seed}"), "-o", str(packed[-1]),
                            "--method", "rtn", "--bits", "4", "--format", "packed", "--no-input-hash", "-q"],
                           check=True, cwd=HERE.parent)
        from modelsurgery.checkpoint import Checkpoint

        ckpt = Checkpoint.open(packed[0])
        n_params = Checkpoint.open(work / "f0").num_parameters
        size_mb = sum(f.stat().st_size for f in packed[0].glob("*.safetensors")) / 1e6
        from modelsurgery.ops.float_input import float_view

        view, _ = float_view(ckpt, "merge")
        float32_mb = sum(view.info(n).nbytes for n in view._dequantized) / 1e6
        start = measure([py, "-c", "import torch, modelsurgery.ops.merge.merge"], args.threads, env)
        ways = ["main", "up-front", *(["every-lookup"] if args.every_lookup else []), "spill"]
        rows, outputs = [], {}
        for way in ways:
            out = work / f"out-{way}"
            r = measure([py, "-c", MERGE, way, *map(str, packed), str(out)], args.threads, env)
            print(f"{way}: {r}", file=sys.stderr, flush=True)
            outputs[way] = Checkpoint.open(out)
            rows.append((way, r))
        import torch

        ref = outputs["spill"]
        same = {w: all(torch.equal(o.get(k), ref.get(k)) for k in ref) for w, o in outputs.items()}
        print(f"\n{n_params / 1e6:.0f}M parameters (hidden {shape['hidden']}, {shape['layers']} layers, intermediate "
              f"{shape['inner']}, vocab {shape['vocab']}); each packed model {size_mb:.0f} MB, its packed weights "
              f"{float32_mb:.0f} MB in float32; {args.threads} threads; process start (torch + merge imported) "
              f"{start['peak_anon_mb']:.0f} MB RssAnon, {start['seconds']:.1f} s\n")
        print("| way | wall s | CPU s | peak RssAnon MB | merged bytes as spill's |\n|---|---:|---:|---:|---|")
        for way, r in rows:
            print(f"| {way} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_anon_mb']:.0f} | "
                  f"{'same' if same[way] else 'DIFFERENT'} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
