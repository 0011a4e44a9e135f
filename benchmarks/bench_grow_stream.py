"""Streaming depth growth: `surgery grow --method stack --factor 2` on a ~1.7 GB bf16 LLaMA-shaped checkpoint
against a plain copy of the same number of bytes (input read, output written), measured in the same run.

Prints wall times (each run followed by a sync, so writing to disk is paid by every run), the ratio, and the
peak RSS of each child process (os.wait4: the child's own rusage, the per-process form of
getrusage(RUSAGE_CHILDREN)). Touched mmap pages would count in RSS, which is
why the stack writer copies bytes file to file instead of mapping the input. The provenance record
hashes the input (one extra full read); its cost is measured separately and the stack is also timed
without it (--no-input-hash). Everything is written under --workdir and removed at the end.

    python benchmarks/bench_grow_stream.py [--layers 16] [--workdir /tmp] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INNER, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4


def llama_tensors(layers: int) -> list:
    """LLaMA-shaped bf16 tensors with random values, each generated only when the writer reaches it."""
    import torch

    from modelsurgery.checkpoint import PlannedTensor

    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "mlp.gate_proj.weight": (INNER, HIDDEN), p + "mlp.up_proj.weight": (INNER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INNER),
        })
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    gen = torch.Generator().manual_seed(0)
    return [PlannedTensor(n, s, torch.bfloat16,
                          lambda s=s: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16))
            for n, s in shapes.items()]


def llama_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INNER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def generate(folder: Path, layers: int) -> None:
    """Write the input checkpoint (run in a child so that this process never holds torch or tensors)."""
    from modelsurgery.checkpoint import write_checkpoint

    write_checkpoint(folder, llama_tensors(layers), config=llama_config(layers))


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` as a child and wait for it with os.wait4 to get its own ru_maxrss. The page cache is
    flushed before (untimed) and after (timed) so every run pays for writing its own output to disk."""
    os.sync()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        os.sync()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()}")
        return wall, usage.ru_maxrss / 1024, out.read()


COPY_SCRIPT = """
import os, sys
src, dst, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = bytearray(1 << 24)
view = memoryview(buf)
done = 0
with open(dst, "wb") as out:
    while done < total:
        with open(src, "rb") as f:
            while done < total and (n := f.readinto(buf)):
                n = min(n, total - done)
                out.write(view[:n])
                done += n
"""

KERNEL_COPY_SCRIPT = """
import os, sys
src, dst, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = os.path.getsize(src)
done = 0
with open(dst, "wb") as out:
    while done < total:
        with open(src, "rb") as f:
            pos = 0
            while done < total and pos < size:
                n = os.copy_file_range(f.fileno(), out.fileno(), min(1 << 30, total - done, size - pos))
                pos += n
                done += n
"""

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16 -> ~1.7 GB)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        return generate(args.generate, args.layers)
    root = Path(tempfile.mkdtemp(prefix="bench-grow-stream-", dir=args.workdir))
    try:
        src = root / "llama"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(src), "--layers", str(args.layers)], check=True)
        os.sync()
        weights = src / "model.safetensors"
        in_bytes = weights.stat().st_size
        print(f"input: {args.layers} layers, {in_bytes / 1e9:.3f} GB bf16 "
              f"(written in {time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        digest = hashlib.sha256()
        with open(weights, "rb") as f:  # what Provenance does: sha256 in 8 MB reads
            while block := f.read(1 << 23):
                digest.update(block)
        hash_s = time.perf_counter() - t0
        rows: dict[str, list[tuple[float, float]]] = {}
        out_bytes = None
        for _rep in range(args.repeats):
            out = root / "stacked"
            wall, rss, stdout = measure(["surgery", "grow", str(src), "-o", str(out), "--method", "stack",
                                         "--factor", "2", "--json", "--force"])
            report = json.loads(stdout)
            out_bytes = (out / "model.safetensors").stat().st_size
            assert report["layers_after"] == 2 * args.layers
            rows.setdefault("surgery grow --method stack --factor 2", []).append((wall, rss))
            shutil.rmtree(out)
            wall, rss, _ = measure(["surgery", "grow", str(src), "-o", str(out), "--method", "stack",
                                    "--factor", "2", "--json", "--force", "--no-input-hash"])
            rows.setdefault("same with --no-input-hash", []).append((wall, rss))
            shutil.rmtree(out)
            copy = root / "copy.bin"
            wall, rss, _ = measure([sys.executable, "-c", COPY_SCRIPT, str(weights), str(copy), str(out_bytes)])
            assert copy.stat().st_size == out_bytes
            rows.setdefault("plain copy, 16 MB buffer (baseline)", []).append((wall, rss))
            copy.unlink()
            wall, rss, _ = measure([sys.executable, "-c", KERNEL_COPY_SCRIPT, str(weights), str(copy), str(out_bytes)])
            rows.setdefault("kernel copy (copy_file_range)", []).append((wall, rss))
            copy.unlink()
        base = min(w for w, _ in rows["plain copy, 16 MB buffer (baseline)"])
        print(f"output: {out_bytes / 1e9:.3f} GB; every run reads the input and writes {out_bytes / 1e9:.3f} GB")
        print(f"sha256 of the input (provenance): {hash_s:.2f} s")
        print(f"{'run':48s} {'best s':>8s} {'all s':>16s} {'x copy':>7s} {'peak RSS MB':>12s}")
        for name, vals in rows.items():
            best = min(w for w, _ in vals)
            print(f"{name:48s} {best:8.2f} {' '.join(f'{w:.2f}' for w, _ in vals):>16s} {best / base:7.2f} "
                  f"{max(r for _, r in vals):12.0f}")
        ratio = min(w for w, _ in rows["surgery grow --method stack --factor 2"]) / base
        peak = max(r for _, r in rows["surgery grow --method stack --factor 2"])
        print(f"stack / copy = {ratio:.2f} (target <= 1.5); stack peak RSS = {peak:.0f} MB (target < 600)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
