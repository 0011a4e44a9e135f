"""Benchmarks of `surgery merge` (weight matching, Git Re-Basin), each against a baseline measured
in the same run. Parts (``--parts``, comma-separated, default all):

- digits: naive vs matched midpoint accuracy on the digits fixtures, every pair of seeds
  (target: matched within 1 point of the endpoints' mean accuracy);
- three: three-model merges, naive vs matched;
- timing: weight matching of two 3x2048 MLPs, ours vs a plain reference written here (scipy
  assignment, one full pass over all groups per iteration, similarities recomputed every time);
- gpt2: two GPT-2-small-shaped checkpoints (transformers' GPT2Config defaults, 124M parameters,
  random init, two seeds) matched and merged by the CLI in a subprocess: wall time and peak RSS.

    python benchmarks/bench_merge.py                      # everything
    python benchmarks/bench_merge.py --parts timing --width 2048
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.spec import permute_tensor
from modelsurgery.ops.match.weight_matching import objective, weight_matching
from modelsurgery.ops.merge.merge import MergeOptions, merge_checkpoints

FIX = ROOT / "fixtures"
DATA = FIX / "data" / "digits_eval.safetensors"


def table(rows: list[list], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
    print()


def digits(tmp: Path) -> None:
    print("## digits: midpoint accuracy, naive vs weight matching (eval split, 599 samples)\n")
    rows = []
    for kind, seeds in (("mlp", 3), ("cnn", 3), ("resnet", 2)):
        for i, j in itertools.combinations(range(seeds), 2):
            paths = [FIX / "digits" / f"{kind}_seed{s}.safetensors" for s in (i, j)]
            for rep in (False, True):
                r = merge_checkpoints(paths, tmp / "m.safetensors", MergeOptions(eval_data=DATA, points=3, repair=rep),
                                      force=True)
                ev = r.evaluation
                mean = sum(e["accuracy"] for e in ev["endpoints"]) / 2
                rows.append([f"{kind} {i}-{j}" + (" +repair" if rep else ""), f"{mean:.4f}",
                             f"{ev['naive'][1]['accuracy']:.4f}", f"{ev['matched'][1]['accuracy']:.4f}",
                             f"{100 * (ev['matched'][1]['accuracy'] - mean):+.2f}",
                             f"{ev['naive_barrier']:.3f}", f"{ev['matched_barrier']:.3f}"])
    table(rows, ["pair", "endpoints mean", "naive mid", "matched mid", "matched-mean (pts)",
                 "naive loss barrier", "matched loss barrier"])


def three(tmp: Path) -> None:
    print("## three-model merges (equal weights), accuracy of the merged model\n")
    rows = []
    for kind, repair in (("mlp", False), ("mlp", True), ("cnn", True), ("resnet", True)):
        paths = [FIX / "digits" / f"{kind}_seed{s}.safetensors" for s in range(3)]
        if not all(p.exists() for p in paths):
            continue
        naive = merge_checkpoints(paths, tmp / "n.safetensors",
                                  MergeOptions(method="linear", eval_data=DATA, repair=repair), force=True)
        matched = merge_checkpoints(paths, tmp / "m.safetensors", MergeOptions(eval_data=DATA, repair=repair),
                                    force=True)
        ends = [e["accuracy"] for e in matched.evaluation["endpoints"]]
        rows.append([kind + (" +repair" if repair else ""), f"{sum(ends) / len(ends):.4f}",
                     f"{naive.evaluation['merged']['accuracy']:.4f}",
                     f"{matched.evaluation['merged']['accuracy']:.4f}"])
    table(rows, ["models", "endpoints mean", "naive 3-way", "matched 3-way"])


def plain_weight_matching(A, B, spec, seed: int = 0, max_iter: int = 100):
    """The reference algorithm as published (Ainsworth et al. 2023, Algorithm 1, free groups only)."""
    rng = random.Random(seed)
    perm = {g: torch.arange(spec.groups[g].size) for g in spec.groups}
    solves = 0
    for _ in range(max_iter):
        progress = False
        order = list(spec.groups)
        rng.shuffle(order)
        for g in order:
            n = spec.groups[g].size
            S = torch.zeros(n, n)
            for t, ax in spec.tensors_of(g):
                wa = A[t].movedim(ax, 0).reshape(n, -1)
                wb = permute_tensor(spec, t, B[t], {h: {"p": p} for h, p in perm.items()}, skip_axis=ax)
                S += wa @ wb.movedim(ax, 0).reshape(n, -1).T
            _, ci = linear_sum_assignment(S.double().numpy(), maximize=True)
            solves += 1
            ci = torch.as_tensor(ci)
            rows = torch.arange(n)
            if float(S[rows, ci].sum()) > float(S[rows, perm[g]].sum()) + 1e-12:
                progress = True
            perm[g] = ci
        if not progress:
            break
    return {h: {"p": p} for h, p in perm.items()}, solves


def mlp_state(seed: int, width: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                      nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    return {k: v.detach() for k, v in m.state_dict().items()}


def timing(width: int) -> None:
    print(f"## weight matching time, two 3x{width} MLPs (random init, seeds 0 and 1), {torch.get_num_threads()} "
          "threads\n")
    A, B = mlp_state(0, width), mlp_state(1, width)
    spec = permutation_spec(detect_family(Checkpoint.from_state_dict(A)))
    t = time.perf_counter()
    ref_perms, ref_solves = plain_weight_matching(A, B, spec)
    t_ref = time.perf_counter() - t
    ref_obj = objective({k: A[k] for k in spec.axes},
                        {k: permute_tensor(spec, k, B[k], ref_perms) for k in spec.axes})
    rows = [["plain reference (scipy, full passes)", f"{t_ref:.2f}", ref_solves, f"{ref_obj:.4f}", "1.00x"]]
    for backend in ("scipy", "lap"):
        t = time.perf_counter()
        r = weight_matching(A, B, spec, backend=backend)
        dt = time.perf_counter() - t
        rows.append([f"ours (--backend {backend})", f"{dt:.2f}", r.solves, f"{r.objective_after:.4f}",
                     f"{dt / t_ref:.2f}x"])
    table(rows, ["implementation", "seconds", "assignment solves", "objective <A,P(B)>", "time vs reference"])


def gpt2(tmp: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    print("## GPT-2-small-shaped merge (GPT2Config defaults, random init), CLI in a subprocess\n")
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config())
        folders.append(tmp / f"gpt2_seed{seed}")
        model.save_pretrained(folders[-1])
        n_params = sum(p.numel() for p in model.parameters())
        del model
    size = sum((f / "model.safetensors").stat().st_size for f in folders)
    cmd = [sys.executable, "-m", "modelsurgery", "merge", str(folders[0]), str(folders[1]), "-o", str(tmp / "merged"),
           "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(proc.stdout.strip())
    table([[f"{n_params / 1e6:.1f}M", f"{size / 1e9:.2f} GB", f"{wall:.1f} s", "120 s", f"{peak / 1e9:.2f} GB",
            f"{peak / size:.2f}x", f"{3 * size / 1e9:.2f} GB"]],
          ["parameters", "two models on disk", "match+merge wall", "target", "peak RSS", "peak / two models",
           "target (3x)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="digits,three,timing,gpt2")
    ap.add_argument("--width", type=int, default=2048)
    args = ap.parse_args()
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "gpt2" in parts:  # first, so RUSAGE_CHILDREN sees only the merge subprocess
            gpt2(tmp)
        if "digits" in parts:
            digits(tmp)
        if "three" in parts:
            three(tmp)
        if "timing" in parts:
            timing(args.width)


if __name__ == "__main__":
    main()
