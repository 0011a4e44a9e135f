"""Weight Aligning on the class-incremental digits MLPs: eval accuracy before (the baseline) and after.

For the bundled fixtures (trained with and without the paper's FC weight clipping) and every setting
(L1/L2 norm, bias scaled/kept, gamma capped/uncapped), prints gamma, accuracy overall, on old and on
new classes, and the share of predictions in new classes, before -> after, all measured in this run.

  python benchmarks/bench_align.py                      # the bundled fixtures
  python benchmarks/bench_align.py --retrain-seeds 1,2  # also retrain the fixture recipe with other seeds
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

from modelsurgery.ops.align import AlignOptions, align_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
DATA = FIXTURES / "data" / "digits_eval.safetensors"
SETTINGS = [(norm, bias, clamp) for norm in (1, 2) for bias in ("scale", "keep") for clamp in (True, False)]
#: for retrained seeds: the official code's choices and PyCIL's, each capped and uncapped
SHORT = [(1, "scale", True), (1, "scale", False), (2, "keep", True), (2, "keep", False)]


def retrained(seeds: list[int], folder: Path) -> dict[str, Path]:
    """The fixture recipe (fixtures/make_incremental.py) rerun with other seeds."""
    spec = importlib.util.spec_from_file_location("make_incremental", FIXTURES / "make_incremental.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    paths = {}
    for seed in seeds:
        models = mod.build(seed)
        for name in ("clipped", "unclipped"):
            path = folder / f"{name}_seed{seed}.safetensors"
            mod.save(models[name], path, {"seed": seed})
            paths[f"{name} (seed {seed})"] = path
    return paths


def bench(models: dict[str, Path], settings: list[tuple[int, str, bool]]) -> list[dict]:
    rows = []
    for label, path in models.items():
        for norm, bias, clamp in settings:
            rep = align_checkpoint(path, None, AlignOptions(old_classes=5, norm=norm, bias=bias, clamp=clamp,
                                                            eval_data=DATA))
            g = rep.groups[1]
            rows.append({"model": label, "norm": f"L{norm}", "bias": bias, "cap": "yes" if clamp else "no",
                         "gamma": g.gamma, "capped": g.capped, "neg": rep.negative_share,
                         "before": rep.eval["before"], "after": rep.eval["after"]})
    return rows


def show(rows: list[dict]) -> None:
    head = (f"{'model':<22} {'norm':<4} {'bias':<5} {'cap':<3} {'gamma':>6} {'neg w':>6}  "
            f"{'accuracy':>15}  {'old classes':>15}  {'new classes':>15}  {'predicted new':>15}")
    print(head)
    print("-" * len(head))
    for r in rows:
        b, a = r["before"], r["after"]

        def pair(k: str, b: dict = b, a: dict = a) -> str:
            return f"{b[k]:.3f} -> {a[k]:.3f}"

        gamma = f"{r['gamma']:.3f}" + ("*" if r["capped"] else " ")
        print(f"{r['model']:<22} {r['norm']:<4} {r['bias']:<5} {r['cap']:<3} {gamma:>7} {r['neg']:>5.0%}  "
              f"{pair('accuracy'):>15}  {pair('accuracy_old'):>15}  {pair('accuracy_new'):>15}  "
              f"{pair('new_prediction_share'):>15}")
    print("* gamma > 1 was capped at 1 (rows left unchanged); 'before' is the unaligned model, measured in this run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain-seeds", default="", help="comma-separated seeds to retrain the recipe with")
    args = parser.parse_args()
    models = {name: FIXTURES / "digits" / f"incremental_{name}.safetensors" for name in ("clipped", "unclipped")}
    missing = [str(p) for p in [*models.values(), DATA] if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run python fixtures/make_fixtures.py")
    print(f"eval data: {DATA.relative_to(ROOT)}; old classes 0-4, new classes 5-9")
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(models, SETTINGS)
        seeds = [int(s) for s in args.retrain_seeds.split(",") if s.strip()]
        if seeds:
            rows += bench(retrained(seeds, Path(tmp)), SHORT)
        show(rows)


if __name__ == "__main__":
    main()
