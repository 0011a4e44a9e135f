"""Where `surgery analyze` spends its time, and its top-k singular triplets against a full SVD.

1. Decompositions, per matrix shape of a LLaMA-shaped model (hidden H, intermediate I, vocabulary V: the
   embedding/head V x H, q/k/v/o H x H, gate/up I x H, down H x I; random N(0, 0.02) weights rounded to bf16):
   seconds (wall and CPU) of one ``torch.linalg.svd`` in float32 (what analyze ran before: four per weight
   matrix) and of one ``top_singular`` (what it runs now: two per weight matrix), and their top-k errors against
   numpy's full SVD in float64 (singular values relative to s_1; angle of each vector), side by side, one process.
2. ``--pair``: ``analyze_pair`` on two such models of 2 blocks (bench_scale.generate, seeds 0 and 1), the time of
   weight matching and of the singular-vector stage (from its progress events), with this code and, given
   ``--baseline DIR`` (a checkout, e.g. ``git worktree add /tmp/old REV``), with DIR's code, one after the other.
3. ``--solvers``: the assignment problem of the MLP's intermediate group (I units: the summed similarities of
   gate, up and down) solved by lap (``lap.lapjv``) and by scipy (``linear_sum_assignment``).

    python benchmarks/bench_analyze.py --threads 1                          # hidden 1024 (I 2816, V 16000)
    python benchmarks/bench_analyze.py --threads 1 --hidden 2048 --inner 5632 --vocab 32000 --solvers
    python benchmarks/bench_analyze.py --threads 1 --pair --baseline /tmp/old --skip-svd
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def angles(x, ref) -> float:
    """The largest angle (radians) between matching columns of ``x`` and ``ref`` (signs ignored)."""
    import numpy as np

    cos = np.clip(np.abs((x * ref).sum(0)), 0.0, 1.0)
    return float(np.arccos(cos).max())


def decompositions(shapes: dict[str, tuple[int, int]], k: int) -> list[dict]:
    import numpy as np
    import scipy.linalg  # noqa: F401  (imported before the first timed call)
    import torch

    from modelsurgery.ops.analyze import top_singular

    gen = torch.Generator().manual_seed(0)
    out = []
    for role, shape in shapes.items():
        w = (torch.randn(shape, generator=gen) * 0.02).bfloat16().float()
        t = time.perf_counter()
        U, S, Vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
        ref_s = time.perf_counter() - t
        row = {"role": role, "shape": list(shape), "numpy_float64_svd_s": ref_s,
               "relative_gaps": (-np.diff(S[:k + 1]) / S[0]).tolist()}
        t, c = time.perf_counter(), time.process_time()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        row["torch_svd_float32_s"], row["torch_svd_float32_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        row["torch_svd_float32_err"] = {"sv": float(np.abs(s[:k].double().numpy() - S[:k]).max() / S[0]),
                                        "u": angles(u[:, :k].double().numpy(), U[:, :k]),
                                        "v": angles(vh[:k].double().numpy().T, Vh[:k].T)}
        del u, s, vh
        t, c = time.perf_counter(), time.process_time()
        top = top_singular(w, k)
        row["top_singular_s"], row["top_singular_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        row["top_singular_err"] = {"sv": float(np.abs(top.s[:k].numpy() - S[:k]).max() / S[0]),
                                   "u": angles(top.u.numpy(), U[:, :k]), "v": angles(top.vh.numpy().T, Vh[:k].T)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
    return out


PAIR = """
import json, sys, time
from pathlib import Path
from modelsurgery.ops.analyze import AnalyzeOptions, analyze_pair
t0, c0 = time.perf_counter(), time.process_time()
marks = {}
def progress(stage, i, n, info):
    marks.setdefault(stage, [time.perf_counter() - t0, 0.0])[1] = time.perf_counter() - t0
r = analyze_pair(Path(sys.argv[1]), Path(sys.argv[2]), AnalyzeOptions(), progress=progress).to_dict()
total = time.perf_counter() - t0
# matching ends at its last event; the singular-vector stage runs from there to the end
match_end = marks["weight matching"][1]
print(json.dumps({"total_s": total, "cpu_s": time.process_time() - c0, "matching_s": match_end,
                  "singular_vectors_s": total - match_end,
                  "objective": [r["objective_before"], r["objective_after"]],
                  "layers": {x["name"]: {k: x.get(k) for k in ("alignment_before", "alignment_after", "separated")}
                             for x in r["layers"]}}))
"""


def pair(a: Path, b: Path, code_dir: Path, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    res = subprocess.run([sys.executable, "-c", PAIR, str(a), str(b)], env=env, capture_output=True, text=True,
                         cwd=code_dir)  # python -c puts the current folder first on sys.path
    if res.returncode != 0:
        raise SystemExit(f"analyze with {code_dir} failed: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def alignment_change(new: dict, old: dict) -> dict:
    """The largest |new - old| of the reported alignments: over every pair, and over the pairs the new report
    calls separated."""
    every, apart = 0.0, 0.0
    for name, layer in new["layers"].items():
        for key in ("alignment_before", "alignment_after"):
            for x, y, ok in zip(layer[key], old["layers"][name][key], layer["separated"]):
                every = max(every, abs(x - y))
                apart = max(apart, abs(x - y)) if ok else apart
    return {"every_pair": every, "separated_pairs": apart,
            "pairs": sum(len(x["separated"]) for x in new["layers"].values()),
            "separated": sum(sum(x["separated"]) for x in new["layers"].values())}


def solvers(a: Path, b: Path) -> dict:
    import lap
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    from modelsurgery.checkpoint import Checkpoint

    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    p = "model.layers.0.mlp."
    S = sum(ca.get(p + n).float() @ cb.get(p + n).float().T for n in ("gate_proj.weight", "up_proj.weight"))
    S = S + ca.get(p + "down_proj.weight").float().T @ cb.get(p + "down_proj.weight").float()
    cost = S.to(torch.float64).numpy()
    out = {"n": cost.shape[0]}
    t = time.perf_counter()
    _, x, _ = lap.lapjv(-cost, extend_cost=False)
    out["lap_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _, perm = linear_sum_assignment(cost, maximize=True)
    out["scipy_s"] = time.perf_counter() - t
    rows = np.arange(cost.shape[0])
    out["same_value"] = bool(np.isclose(cost[rows, np.asarray(x)].sum(), cost[rows, perm].sum(), rtol=1e-12))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inner", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch/BLAS threads (OMP_NUM_THREADS) of every run")
    ap.add_argument("--skip-svd", action="store_true", help="leave out part 1")
    ap.add_argument("--pair", action="store_true", help="time analyze_pair on two 2-block models (part 2)")
    ap.add_argument("--baseline", type=Path, help="with --pair: also run the code checked out in this folder")
    ap.add_argument("--solvers", action="store_true", help="time lap and scipy on the MLP group (part 3)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    if args.threads:  # before torch and numpy load their BLAS
        os.environ.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                           "OPENBLAS_NUM_THREADS": str(args.threads)})
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    h, i, v = args.hidden, args.inner, args.vocab
    report: dict = {"hidden": h, "inner": i, "vocab": v, "top_k": args.top_k, "threads": args.threads}
    if not args.skip_svd:
        shapes = {"embed/head": (v, h), "q/k/v/o": (h, h), "gate/up": (i, h), "down": (h, i)}
        report["decompositions"] = decompositions(shapes, args.top_k)
        counts = {"embed/head": 2, "q/k/v/o": 8, "gate/up": 4, "down": 2}  # per 2-block model
        rows = {r["role"]: r for r in report["decompositions"]}
        report["svd_stage_estimate_s"] = {
            "before (4 torch.linalg.svd per matrix)": sum(4 * c * rows[r]["torch_svd_float32_s"]
                                                          for r, c in counts.items()),
            "after (2 top_singular per matrix)": sum(2 * c * rows[r]["top_singular_s"] for r, c in counts.items())}
    if args.pair or args.solvers:
        sys.path.insert(0, str(HERE))
        from bench_scale import generate

        work = Path(tempfile.mkdtemp(prefix="bench_analyze-", dir=args.workdir))
        shape = {"hidden": h, "layers": 2, "inner": i, "vocab": v, "heads": args.heads}
        a, b = work / "a", work / "b"
        generate(a, shape, 0)
        generate(b, shape, 1)
        try:
            if args.solvers:
                report["solvers"] = solvers(a, b)
                print(json.dumps(report["solvers"]), file=sys.stderr, flush=True)
            if args.pair:
                report["pair"] = {"this code": pair(a, b, ROOT, args.threads)}
                if args.baseline:
                    base = report["pair"]["baseline"] = pair(a, b, args.baseline.resolve(), args.threads)
                    report["pair"]["alignment_change"] = alignment_change(report["pair"]["this code"], base)
        finally:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if "decompositions" in report:
        print("\n| matrix | torch.linalg.svd float32 s | top_singular s | svd err (sv, u, v) | top_singular err |\n"
              "|---|---:|---:|---|---|")
        for r in report["decompositions"]:
            e, f = r["torch_svd_float32_err"], r["top_singular_err"]
            print(f"| {r['role']} {r['shape'][0]}x{r['shape'][1]} | {r['torch_svd_float32_s']:.2f} | "
                  f"{r['top_singular_s']:.2f} | {e['sv']:.1e}, {e['u']:.1e}, {e['v']:.1e} | "
                  f"{f['sv']:.1e}, {f['u']:.1e}, {f['v']:.1e} |")
        for name, s in report["svd_stage_estimate_s"].items():
            print(f"singular-vector stage of a 2-block model, {name}: {s:.1f} s")
    for name, r in report.get("pair", {}).items():
        if name == "alignment_change":
            print(f"largest alignment change against the baseline: {r['every_pair']:.2e} over every pair, "
                  f"{r['separated_pairs']:.2e} over the separated ones ({r['separated']} of {r['pairs']})")
            continue
        print(f"analyze_pair, {name}: {r['total_s']:.1f} s, {r['cpu_s']:.1f} CPU s (matching {r['matching_s']:.1f} s, "
              f"singular vectors {r['singular_vectors_s']:.1f} s)")
    if "solvers" in report:
        s = report["solvers"]
        print(f"assignment n={s['n']}: lap {s['lap_s']:.2f} s, scipy {s['scipy_s']:.2f} s, "
              f"same value: {s['same_value']}")


if __name__ == "__main__":
    main()
