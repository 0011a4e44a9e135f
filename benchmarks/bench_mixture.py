"""MixtureGrowth (Pham et al. 2024) against random-init growth and function-preserving width growth on the
digits MLPs (64-128-128-10 -> 64-256-256-10), at the same training budget after growing.

Grown models (all 64-256-256-10):
- mixture: `surgery grow mlp_seed0 mlp_seed1 --method mixture` (two trained members on the block diagonal,
  off-diagonal blocks new orthogonal combinations of the templates); also with --coef-scale 0.1;
- random-init: mlp_seed0's weights in the top-left blocks, every new weight at PyTorch's default init;
- width / width --split: `surgery grow mlp_seed0 --method width --factor 2` (zero fan-out; Net2Net split);
- scratch: the large MLP from PyTorch's default init (reference).
Each is trained with Adam (lr 1e-3, batch 64) on digits_train for each budget, 3 seeds; eval on digits_eval.

    python benchmarks/bench_mixture.py [--budgets 0,25,100,400] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load_model(path: Path) -> nn.Module:
    return detect_family(Checkpoint.open(path)).build_module()


def random_init_growth(small: Path, seed: int) -> nn.Module:
    """Default-initialised large MLP with the small model's trained weights copied into its top-left blocks."""
    torch.manual_seed(seed)
    big = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    state = big.state_dict()
    for name, value in load_file(small).items():
        index = tuple(slice(0, d) for d in value.shape)
        state[name][index] = value
    big.load_state_dict(state)
    return big


def scratch(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(model: nn.Module, x, y, steps: int, seed: int) -> nn.Module:
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def surgery(*args: str) -> None:
    subprocess.run(["surgery", "grow", *args, "--force", "--quiet"], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0,25,100,400")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    torch.set_num_threads(2)
    train_d = load_file(FIXTURES / "data" / "digits_train.safetensors")
    eval_d = load_file(FIXTURES / "data" / "digits_eval.safetensors")
    xt, yt, xe, ye = train_d["inputs"], train_d["labels"], eval_d["inputs"], eval_d["labels"]
    a, b = FIXTURES / "digits" / "mlp_seed0.safetensors", FIXTURES / "digits" / "mlp_seed1.safetensors"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        surgery(str(a), str(b), "-o", str(t / "mix.safetensors"), "--method", "mixture")
        surgery(str(a), str(b), "-o", str(t / "mix01.safetensors"), "--method", "mixture", "--coef-scale", "0.1")
        surgery(str(a), "-o", str(t / "width.safetensors"), "--method", "width", "--factor", "2")
        surgery(str(a), "-o", str(t / "split.safetensors"), "--method", "width", "--factor", "2", "--split")
        starts = {
            "mixture (2 members)": lambda s: load_model(t / "mix.safetensors"),
            "mixture, --coef-scale 0.1": lambda s: load_model(t / "mix01.safetensors"),
            "random-init growth": lambda s: random_init_growth(a, s),
            "width (zero fan-out)": lambda s: load_model(t / "width.safetensors"),
            "width --split (Net2Net)": lambda s: load_model(t / "split.safetensors"),
            "large from scratch": scratch,
        }
        print(f"digits: {len(xt)} train, {len(xe)} eval; small members: "
              f"seed0 acc {evaluate(load_model(a), xe, ye)[1]:.4f}, seed1 acc {evaluate(load_model(b), xe, ye)[1]:.4f}")
        header = f"{'grown model':28s}" + "".join(f"{'steps ' + str(n):>20s}" for n in budgets)
        print("eval accuracy / loss after training (mean of seeds)")
        print(header)
        for name, make in starts.items():
            cells = []
            for n in budgets:
                accs, losses = [], []
                for s in range(args.seeds):
                    model = train(make(100 + s), xt, yt, n, 200 + s)
                    loss, acc = evaluate(model, xe, ye)
                    accs.append(acc)
                    losses.append(loss)
                cells.append(f"{sum(accs) / len(accs):.4f} / {sum(losses) / len(losses):.3f}")
            print(f"{name:28s}" + "".join(f"{c:>20s}" for c in cells), flush=True)
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
