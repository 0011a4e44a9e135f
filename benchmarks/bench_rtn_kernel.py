"""Streaming RTN's rounding alone, in process: ``streaming.rounded_in_chunks`` (float32 view, grid, codes,
packing) over three LLaMA-MLP-sized bf16 weights (5632 x 2048, 2048 x 5632, 2048 x 2048), on one torch
thread. Prints nanoseconds per weight (best of ``--repeat``) and the SHA-256 of every output tensor's
bytes, so that two versions of the code can be compared for speed and for identical output:

    git worktree add /tmp/old REV
    PYTHONPATH=/tmp/old python benchmarks/bench_rtn_kernel.py; python benchmarks/bench_rtn_kernel.py
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="packed", choices=["packed", "fake"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import modelsurgery
    from modelsurgery.ops.quantize import streaming
    from modelsurgery.ops.quantize.grids import QuantScheme
    from modelsurgery.ops.quantize.operation import FORMATS
    from modelsurgery.ops.quantize.reconstruct import Target
    from modelsurgery.ops.quantize.rtn import RTNQuantizer

    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(shape, generator=gen) * 0.02).bfloat16()
               for shape in ((5632, 2048), (2048, 5632), (2048, 2048))]
    n = sum(w.numel() for w in weights)
    scheme = QuantScheme(bits=args.bits)
    best, outputs = float("inf"), []
    for _ in range(args.repeat):
        start = time.perf_counter()
        outputs = [streaming.rounded_in_chunks(w, Target("x.weight"), scheme, RTNQuantizer, None, args.format,
                                               FORMATS[args.format]) for w in weights]
        best = min(best, time.perf_counter() - start)
    digest = hashlib.sha256()
    for out in outputs:
        for name in sorted(out):
            digest.update(out[name].contiguous().view(torch.uint8).numpy().tobytes())
    print(f"{modelsurgery.__file__}: {args.format} {args.bits}-bit, {best / n * 1e9:.3f} ns per weight "
          f"(best of {args.repeat}), outputs sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
