"""Calibration batches for block reconstruction: a tensors file (inputs / input_ids, attention_mask)
or a text file (one sample a line) tokenized with the model folder's tokenizer.json.

Batches are dicts keyed by the family's ``input_names()``; they are checked against the model
by a forward pass before any work, so data that does not fit fails with one clear line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modelsurgery.errors import SurgeryError

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".npz")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, torch.Tensor):
            return {"inputs": obj}
        if isinstance(obj, dict):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        raise SurgeryError(f"{path}: expected a tensor or a dict of tensors")
    with np.load(path) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


def tensor_samples(path: Path, input_names: list[str], samples: int, seq_len: int | None) -> dict[str, torch.Tensor]:
    data = read_tensors(path)
    if "input_ids" in data:
        out = {"input_ids": data["input_ids"].long()}
        if "attention_mask" in data and "attention_mask" in input_names:
            out["attention_mask"] = data["attention_mask"].long()
        if seq_len:
            out = {k: v[:, :seq_len] for k, v in out.items()}
    elif "inputs" in data or "input" in data:
        out = {input_names[0]: data.get("inputs", data.get("input")).float()}
    else:
        raise SurgeryError(f"{path}: no 'inputs' or 'input_ids' tensor (found: {', '.join(sorted(data)) or 'none'})")
    return {k: v[:samples] for k, v in out.items()}


def text_samples(path: Path, tokenizer_file: Path | None, input_names: list[str], samples: int,
                 seq_len: int) -> dict[str, torch.Tensor]:
    if tokenizer_file is None or not tokenizer_file.is_file():
        where = tokenizer_file.parent if tokenizer_file else "the model"
        raise SurgeryError(
            f"{path}: a text calibration file needs the model folder's tokenizer.json (none in {where}); "
            "pass a tensors file (.safetensors/.pt/.npz) instead"
        )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.no_truncation()
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise SurgeryError(f"{path}: no text lines")
    if "attention_mask" in input_names:
        # one sentence per sample, padded (encoders)
        ids = [e.ids[:seq_len] for e in tok.encode_batch(lines[:samples])]
        width = max(len(x) for x in ids)
        pad = tok.token_to_id("[PAD]") or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
    # language models: the text as one stream cut into windows of seq_len tokens
    stream = [t for e in tok.encode_batch(lines) for t in e.ids]
    n = min(samples, len(stream) // seq_len)
    if n == 0:
        raise SurgeryError(f"{path}: {len(stream)} tokens, fewer than one window of --seq-len {seq_len}")
    return {"input_ids": torch.tensor(stream[: n * seq_len]).reshape(n, seq_len)}


def load_calibration(path: Path, input_names: list[str], folder: Path | None, samples: int = 128,
                     seq_len: int = 128) -> dict[str, torch.Tensor]:
    """All calibration samples as one dict of tensors (first dim = samples)."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: calibration file not found")
    if path.suffix in TENSOR_SUFFIXES:
        return tensor_samples(path, input_names, samples, seq_len)
    tokenizer = folder / "tokenizer.json" if folder is not None else None
    return text_samples(path, tokenizer, input_names, samples, seq_len)


def batches(data: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(data.values())).shape[0]
    return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
