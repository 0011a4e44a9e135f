"""Startup time of the `surgery` command: import, --version, --help and `inspect` of a 1.7 GB checkpoint
(headers only), against `python -c pass`, for this tree and optionally an earlier commit.

The checkpoint is a LLaMA-shaped bf16 safetensors file (16 layers, hidden 2048: 0.84 B parameters,
1.7 GB) written as a header plus a sparse file, so generating it costs no disk time; `--small` writes
a 2-layer one instead. Each step runs in a fresh interpreter; the figure is the median wall time of
`--repeat` runs. `--before REF` also measures the tree at git commit REF (checked out with
`git worktree` in a temporary folder, removed afterwards), the same steps in the same run.

    python benchmarks/bench_startup.py --before 91c0d50          # before/after table for the README
    python benchmarks/bench_startup.py --small --repeat 3        # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = "import sys; from modelsurgery.cli.app import main; sys.argv = ['surgery', *sys.argv[1:]]; main()"
#: MAIN, then whether torch was imported (printed on stderr, after the command's own output)
MAIN_TORCH = ("import sys; from modelsurgery.cli.app import main; sys.argv = ['surgery', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")


def write_checkpoint(path: Path, layers: int, hidden: int = 2048, inter: int = 5632, vocab: int = 32000) -> int:
    """A bf16 LLaMA-shaped safetensors file: a real header, zero (sparse) data. Returns its size."""
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
              "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [hidden, hidden], p + "self_attn.k_proj.weight": [256, hidden],
                       p + "self_attn.v_proj.weight": [256, hidden], p + "self_attn.o_proj.weight": [hidden, hidden],
                       p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
                       p + "mlp.down_proj.weight": [hidden, inter], p + "input_layernorm.weight": [hidden],
                       p + "post_attention_layernorm.weight": [hidden]})
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def timed(cmd: list[str], env: dict, repeat: int) -> float:
    """Median wall time; run in the tree's folder (``-c`` puts the current folder first on the path)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        r = subprocess.run(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
        times.append(time.perf_counter() - start)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    return statistics.median(times)


def imports_torch(cmd: list[str], env: dict) -> str:
    """'yes' or 'no': whether ``cmd`` (a MAIN_TORCH run) imported torch."""
    r = subprocess.run(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, check=True)
    return "yes" if r.stderr.strip().splitlines()[-1] == "True" else "no"


def measure(tree: Path, ckpt: Path, repeat: int) -> dict[str, float | str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    py = [sys.executable]
    where = subprocess.run([*py, "-c", "import modelsurgery.cli.app as m; print(m.__file__)"], env=env, cwd=tree,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(tree)):
        raise SystemExit(f"measuring {tree} but modelsurgery is imported from {where}")
    return {
        "python -c pass": timed([*py, "-c", "pass"], env, repeat),
        "import modelsurgery.cli.app": timed([*py, "-c", "import modelsurgery.cli.app"], env, repeat),
        "surgery --version": timed([*py, "-c", MAIN, "--version"], env, repeat),
        "surgery --help": timed([*py, "-c", MAIN, "--help"], env, repeat),
        f"surgery inspect ({ckpt.stat().st_size / 1e9:.1f} GB)": timed([*py, "-c", MAIN, "inspect", str(ckpt)],
                                                                       env, repeat),
        "surgery --help imports torch": imports_torch([*py, "-c", MAIN_TORCH, "--help"], env),
        "surgery inspect imports torch": imports_torch([*py, "-c", MAIN_TORCH, "inspect", str(ckpt)], env),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="2-layer checkpoint instead of the 1.7 GB one")
    ap.add_argument("--repeat", type=int, default=5, help="runs per step (median reported)")
    ap.add_argument("--before", help="git commit to measure as well (in a temporary worktree)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "llama.safetensors"
        size = write_checkpoint(ckpt, 2 if args.small else 16)
        print(f"checkpoint: {size / 1e9:.2f} GB header+sparse data; median of {args.repeat} runs; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        columns = {"this tree": measure(ROOT, ckpt, args.repeat)}
        if args.before:
            before = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before],
                           check=True)
            try:
                columns = {f"before ({args.before})": measure(before, ckpt, args.repeat), **columns}
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=True)
    names = list(next(iter(columns.values())))
    width = max(map(len, names))
    print(f"{'step':<{width}}  " + "  ".join(f"{c:>18}" for c in columns))
    for n in names:
        print(f"{n:<{width}}  " + "  ".join(f"{col[n]:>17.2f}s" if isinstance(col[n], float) else f"{col[n]:>18}"
                                             for col in columns.values()))


if __name__ == "__main__":
    main()
