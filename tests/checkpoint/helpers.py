"""Shared helpers for the checkpoint tests: bit-exact comparison and directory snapshots."""

from __future__ import annotations

from pathlib import Path

import torch


def bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (bit-exact comparison, NaN payloads and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        assert tuple(got[k].shape) == tuple(w.shape), k
        assert bits(got[k]) == bits(w), k


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temp files included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} | {
        str(p.relative_to(folder)) + "/": b"" for p in sorted(folder.rglob("*")) if p.is_dir()
    }


def sample_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of every dtype the formats hold, with awkward values (NaN, inf, -0.0, extremes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(5, 7, generator=g)
    base[0, 0], base[0, 1], base[0, 2], base[0, 3] = float("nan"), float("inf"), -0.0, 3e38
    return {
        "f32": base.clone(),
        "f16": (base * 100).to(torch.float16),
        "bf16": (base * 1e30).to(torch.bfloat16),
        "f64": base.double() / 3,
        "i64": torch.randint(-(2**62), 2**62, (4,), generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (3, 2), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 2, 2), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "nested.name.scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
