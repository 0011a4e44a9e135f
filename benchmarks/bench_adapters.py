"""Adapters: `surgery fold` against PEFT's merge_and_unload on the same model and adapter in the same run,
and `surgery extract` error against rank on a real fine-tune.

1. Fold. A LLaMA-shaped float32 checkpoint (random weights, written by transformers' save_pretrained) and a
   random rank-16 PEFT LoRA on every linear of its blocks. Each side runs in a fresh process:
   PEFT = the usual script (AutoModelForCausalLM.from_pretrained, PeftModel.from_pretrained,
   merge_and_unload, save_pretrained); ours = fold_adapters. Printed: wall seconds of the operation
   (imports excluded), the process's peak RSS (VmHWM) and its RSS after imports, and the largest difference
   between the two outputs' tensors.
2. Extract. The fixture LLaMA character LM (fixtures/charlm/llama) is fine-tuned for --steps AdamW steps
   on other text (Python stdlib package sources under email/, json/, xml/, disjoint from the fixture's
   top-level modules); its embeddings, norms and head are frozen, so the whole change lies in the block
   linears a LoRA can hold. For each rank (and energy fraction) the adapter is extracted, folded back,
   and evaluated on held-out text of the fine-tune domain: mean and max relative error of the layer
   deltas, adapter size, eval loss (base and TUNED losses printed for reference; rank 64 is the full
   rank of the 64-wide model, so its row must reproduce TUNED).

Both sides run with --threads torch threads (default 1).

    python benchmarks/bench_adapters.py [--hidden 512 --layers 8] [--steps 300] [--threads 1] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or its peak (VmHWM). VmHWM belongs to the process's own
    address space; getrusage's ru_maxrss would also carry the parent's peak from before exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(cfg: dict) -> dict:
    """One measured run in this (fresh) process."""
    import torch

    torch.set_num_threads(cfg["threads"])

    if cfg["side"] == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    else:
        from modelsurgery.ops.adapters import fold_adapters
    after_imports = rss_mb()
    start = time.perf_counter()
    if cfg["side"] == "peft":
        model = AutoModelForCausalLM.from_pretrained(cfg["base"])
        model = PeftModel.from_pretrained(model, cfg["adapter"]).merge_and_unload()
        model.save_pretrained(cfg["out"])
    else:
        fold_adapters(cfg["base"], [cfg["adapter"]], cfg["out"])
    seconds = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_imports_mb": after_imports}


def spawn(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    if proc.returncode:
        raise RuntimeError(f"{cfg['side']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_fold(args, workdir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir / "base")
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,  # random A and B: a non-zero update
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, lora).save_pretrained(workdir / "adapter")
    del model
    print(f"fold: LLaMA-shaped float32, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f} M parameters "
          f"({params * 4 / 1e6:.0f} MB); LoRA r=16 on every block linear", flush=True)
    rows = {}
    for side in ("peft", "ours"):
        cfg = {"side": side, "base": str(workdir / "base"), "adapter": str(workdir / "adapter"),
               "out": str(workdir / f"out-{side}"), "threads": args.threads}
        rows[side] = spawn(cfg)
    with safe_open(str(workdir / "out-peft" / "model.safetensors"), "pt") as a, \
            safe_open(str(workdir / "out-ours" / "model.safetensors"), "pt") as b:
        diff = max(float((a.get_tensor(k) - b.get_tensor(k)).abs().max()) for k in a.keys())  # noqa: SIM118
    print("| tool | wall s | peak RSS MB | RSS after imports MB | peak - imports MB |")
    print("|---|---|---|---|---|")
    names = {"peft": "PEFT merge_and_unload + save_pretrained", "ours": "surgery fold (fold_adapters)"}
    for side, r in rows.items():
        print(f"| {names[side]} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_after_imports_mb']:.0f} | "
              f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} |")
    print(f"max |PEFT - ours| over all tensors: {diff:.2e}", flush=True)


def finetune_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for pkg in ("email", "json", "xml") for p in (lib / pkg).rglob("*.py"))
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def lm_loss(model, rows) -> float:
    import torch

    with torch.no_grad():
        return float(model(input_ids=rows, labels=rows).loss)


def bench_extract(args, workdir: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from modelsurgery.ops.adapters import ExtractOptions, extract_lora, fold_adapters

    torch.set_num_threads(args.threads)
    base = ROOT / "fixtures" / "charlm" / "llama"
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    ids = torch.tensor(tok.encode(finetune_text()).ids)
    split = int(len(ids) * 0.9)
    train, held = ids[:split], ids[split:]
    context = 64
    eval_rows = held[: len(held) // context * context].view(-1, context)[:256]
    model = AutoModelForCausalLM.from_pretrained(base).train()
    base_loss = lm_loss(model.eval(), eval_rows)
    linears = [p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in linears:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(linears, lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        s = torch.randint(0, len(train) - context, (16,), generator=gen)
        x = torch.stack([train[i: i + context] for i in s.tolist()])
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    model.eval()
    tuned_loss = lm_loss(model, eval_rows)
    model.save_pretrained(workdir / "tuned")
    shutil.copy(base / "tokenizer.json", workdir / "tuned" / "tokenizer.json")
    print(f"\nextract: fixtures/charlm/llama fine-tuned {args.steps} steps on stdlib email/json/xml sources "
          f"({time.perf_counter() - start:.0f} s); eval loss on held-out text of that domain: base {base_loss:.4f}, "
          f"TUNED {tuned_loss:.4f}", flush=True)
    print("| --rank | layer ranks | mean rel. error | max rel. error | adapter KB | eval loss (base + adapter) |")
    print("|---|---|---|---|---|---|")
    for rank in args.ranks:
        out = workdir / f"lora-{rank}"
        report = extract_lora(base, workdir / "tuned", out, ExtractOptions(rank=rank))
        fold_adapters(base, [out], workdir / f"folded-{rank}")
        loss = lm_loss(AutoModelForCausalLM.from_pretrained(workdir / f"folded-{rank}").eval(), eval_rows)
        errors = [layer.relative_error for layer in report.layers]
        ranks = sorted({layer.rank for layer in report.layers})
        shown = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
        print(f"| {rank:g} | {shown} | {sum(errors) / len(errors):.3f} | {max(errors):.3f} | "
              f"{report.adapter_bytes / 1e3:.0f} | {loss:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ranks", type=float, nargs="+", default=[1, 4, 16, 32, 64, 0.5, 0.9])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--skip-fold", action="store_true")
    parser.add_argument("--skip-extract", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-adapters-", dir=args.workdir))
    try:
        if not args.skip_fold:
            bench_fold(args, workdir)
        if not args.skip_extract:
            bench_extract(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
