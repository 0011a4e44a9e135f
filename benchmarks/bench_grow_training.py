"""Growth pays off in training (Du et al. 2024, "Stacking Your Transformers"): a small GPT-2 character LM is
trained, grown with `stack` (G_stack) and with `interleave` (identity blocks), trained on, and compared with
the large model trained from scratch: the steps each needs to reach the scratch run's final eval loss.

Text: Python standard-library sources read at run time (top-level modules, tests excluded; the modules the
fixture eval set holds out are excluded from training), tokenised with the fixture's character tokenizer;
eval on ``fixtures/data/charlm_eval.safetensors``. Models are transformers' GPT2LMHeadModel (the growth
goes through `surgery grow` on save_pretrained folders, and transformers loads the result).

    python benchmarks/bench_grow_training.py [--small-layers 2] [--factor 2] [--steps 1500] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
CONTEXT = 64


def stdlib_train_text() -> str:
    """Top-level stdlib modules, minus tests and minus the files the fixture holds out for eval/calibration
    (its selection rule: sorted files of 4-80 KB, every 10th from index 3 and 7)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if not p.name.startswith("test") and 4000 < p.stat().st_size < 80000)
    keep = [p for i, p in enumerate(files) if i % 10 not in (3, 7)]
    big = sorted(p for p in lib.glob("*.py") if not p.name.startswith("test") and p.stat().st_size >= 80000)
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in keep + big)


def encode(text: str) -> torch.Tensor:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(FIXTURES / "charlm" / "gpt2" / "tokenizer.json"))
    ids: list[int] = []
    for start in range(0, len(text), 1 << 20):
        ids += tok.encode(text[start:start + (1 << 20)]).ids
    return torch.tensor(ids, dtype=torch.long)


def make_model(layers: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = json.loads((FIXTURES / "charlm" / "gpt2" / "config.json").read_text())
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=cfg["vocab_size"], n_positions=CONTEXT, n_embd=cfg["n_embd"],
                                      n_layer=layers, n_head=cfg["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0))


@torch.no_grad()
def eval_loss(model, eval_ids: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in eval_ids.split(64)]
    model.train()
    return sum(losses) / len(losses)


def train(model, data: torch.Tensor, eval_ids: torch.Tensor, steps: int, seed: int, batch: int, lr: float,
          every: int, label: str) -> list[tuple[int, float]]:
    """AdamW, 50 warm-up steps then constant lr; eval loss every ``every`` steps (step 0 included)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    curve = [(0, eval_loss(model, eval_ids))]
    model.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + CONTEXT] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            curve.append((step, eval_loss(model, eval_ids)))
    print(f"  {label}: {steps} steps in {time.perf_counter() - t0:.0f} s, eval loss {curve[0][1]:.3f} -> "
          f"{curve[-1][1]:.3f}", flush=True)
    return curve


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, loss in curve if loss <= target), None)


def grow_folder(src: Path, out: Path, *args: str) -> None:
    subprocess.run(["surgery", "grow", str(src), "-o", str(out), *args, "--force", "--quiet"], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-layers", type=int, default=2)
    ap.add_argument("--factor", type=int, default=2, help="growth factor g (large = g x small layers)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps of the large model from scratch")
    ap.add_argument("--small-steps", type=int, default=None, help="steps of the small model (default steps/2)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    large_layers = args.small_layers * args.factor
    small_steps = args.small_steps or args.steps // 2
    data = encode(stdlib_train_text())
    eval_ids = load_file(FIXTURES / "data" / "charlm_eval.safetensors")["input_ids"]
    print(f"train text: {len(data):,} characters of stdlib sources; eval: {eval_ids.numel():,} held-out tokens; "
          f"one pass over the text = {len(data) // (args.batch * CONTEXT):,} steps")
    print(f"small: {args.small_layers} layers, large: {large_layers} layers (g = {args.factor})")
    t_start = time.perf_counter()
    scratch = train(make_model(large_layers, 1), data, eval_ids, args.steps, 11, args.batch, args.lr,
                    args.eval_every, f"large from scratch ({large_layers} layers)")
    target = scratch[-1][1]
    small_model = make_model(args.small_layers, 2)
    small = train(small_model, data, eval_ids, small_steps, 12, args.batch, args.lr, args.eval_every,
                  f"small ({args.small_layers} layers)")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        small_dir = Path(tmp) / "small"
        small_model.save_pretrained(small_dir)
        variants = {
            "stack": ["--method", "stack", "--factor", str(args.factor)],
            # one identity block after every small block: 2x depth (interleave cannot go further)
            "interleave": ["--method", "interleave", "--every", "1"],
        }
        for name, opts in variants.items():
            out = Path(tmp) / name
            grow_folder(small_dir, out, *opts)
            grown = GPT2LMHeadModel.from_pretrained(out)
            n_layers = grown.config.n_layer
            runs[name] = (n_layers, train(grown, data, eval_ids, args.steps, 13, args.batch, args.lr,
                                          args.eval_every, f"{name}-grown ({n_layers} layers)"))
    print()
    print(f"target: the scratch run's final eval loss {target:.4f} (after {args.steps} steps)")
    ratio = args.small_layers / large_layers  # small-model step cost relative to a large-model step (blocks)
    print(f"{'run':34s} {'layers':>6s} {'loss at 0':>9s} {'final':>7s} {'steps to target':>16s} "
          f"{'+ small steps (large-equiv.)':>29s}")
    print(f"{'large from scratch':34s} {large_layers:6d} {scratch[0][1]:9.4f} {scratch[-1][1]:7.4f} "
          f"{steps_to(scratch, target):16d} {'':>29s}")
    for name, (n_layers, curve) in runs.items():
        reach = steps_to(curve, target)
        total = f"{reach + small_steps} ({reach + small_steps * ratio:.0f})" if reach is not None else "not reached"
        print(f"{name + ' (small trained ' + str(small_steps) + ')':34s} {n_layers:6d} {curve[0][1]:9.4f} "
              f"{curve[-1][1]:7.4f} {reach if reach is not None else 'not reached':>16} {total:>29s}")
    print(f"small model alone: final eval loss {small[-1][1]:.4f}; wall time {time.perf_counter() - t_start:.0f} s")
    print(f"(eval loss in nats/char; perplexity of the scratch run {math.exp(target):.3f})")


if __name__ == "__main__":
    main()
