"""Calibration and evaluation data readers: tensors from safetensors / .pt / .npz, or text lines
tokenized with a model folder's ``tokenizer.json``.

A data file holds ``inputs`` (features, [N, ...] float) or ``input_ids`` ([N, T] integer, with an
optional ``attention_mask``), and optional ``labels`` ([N] class indices, or [N, T] token targets).
A text file holds one sample a line; it needs the model's tokenizer.json and is right-padded to
``seq_len`` with the tokenizer's pad id (its padding config, ``[PAD]``/``<pad>``, else 0).
Floating-point features are read as float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from modelsurgery.checkpoint.formats import check_dense, require_regular_file
from modelsurgery.errors import SurgeryError

TENSOR_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".npz"}
KNOWN_KEYS = ("inputs", "input_ids", "attention_mask", "labels")
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")


@dataclass
class Dataset:
    """Samples in memory: ``inputs`` (features) or ``input_ids`` + ``attention_mask``, optional ``labels``."""

    source: str
    inputs: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def is_tokens(self) -> bool:
        return self.input_ids is not None

    def __len__(self) -> int:
        return len(self.input_ids if self.is_tokens else self.inputs)

    def select(self, index: slice | torch.Tensor) -> Dataset:
        """The samples at ``index`` (a slice or index tensor) as a new Dataset."""
        pick = lambda t: None if t is None else t[index]
        return replace(self, inputs=pick(self.inputs), input_ids=pick(self.input_ids),
                       attention_mask=pick(self.attention_mask), labels=pick(self.labels))

    def split(self, batch_size: int) -> Iterator[Dataset]:
        """Consecutive chunks of at most ``batch_size`` samples."""
        if batch_size < 1:
            raise SurgeryError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.select(slice(start, start + batch_size))

    def model_inputs(self, family=None) -> dict[str, torch.Tensor]:
        """Keyword inputs for ``module(**inputs)``, named by ``family.input_names()``.

        Token models get ``input_ids``, ``attention_mask`` (ones when the data has none) and
        ``token_type_ids``/``position_ids`` made from shapes; feature models get ``inputs`` under
        their one input name. Without a family: ``input``, or ``input_ids`` (+ ``attention_mask``).
        """
        if family is not None:
            names = family.input_names()
        elif not self.is_tokens:
            names = ["input"]
        else:
            names = ["input_ids"] + (["attention_mask"] if self.attention_mask is not None else [])
        takes_tokens = "input_ids" in names
        if takes_tokens != self.is_tokens:
            what = "token ids" if self.is_tokens else "feature inputs"
            wants = "token ids" if takes_tokens else "feature inputs"
            raise SurgeryError(f"{self.source}: holds {what} but the {family.name} model takes {wants}")
        out: dict[str, torch.Tensor] = {}
        feature_names = [n for n in names if n not in ("input_ids", "attention_mask", "token_type_ids",
                                                        "position_ids")]
        if len(feature_names) > 1 or (takes_tokens and feature_names):
            raise SurgeryError(f"{self.source}: the model needs input '{feature_names[-1]}', which the data "
                               "does not provide")
        for name in names:
            if name == "input_ids":
                out[name] = self.input_ids
            elif name == "attention_mask":
                out[name] = self.attention_mask if self.attention_mask is not None else torch.ones_like(self.input_ids)
            elif name == "token_type_ids":
                out[name] = torch.zeros_like(self.input_ids)
            elif name == "position_ids":
                out[name] = torch.arange(self.input_ids.shape[1]).expand_as(self.input_ids)
            else:
                out[name] = self.inputs
        return out

    def batches(self, batch_size: int, family=None) -> Iterator[dict[str, torch.Tensor]]:
        """Keyword dicts ready for ``module(**batch)``, ``batch_size`` samples each."""
        for part in self.split(batch_size):
            yield part.model_inputs(family)

    def describe(self) -> dict:
        data = self.input_ids if self.is_tokens else self.inputs
        return {"source": self.source, "samples": len(self), "kind": "tokens" if self.is_tokens else "features",
                "shape": list(data.shape), "labels": self.labels is not None}


# ----- reading ----------------------------------------------------------------------------------
def load_data(path: str | Path, *, tokenizer: str | Path | None = None, samples: int | None = None,
              seq_len: int | None = None) -> Dataset:
    """Read a data file. ``tokenizer``: a model folder holding tokenizer.json, or the file itself
    (needed for text). ``samples``: keep the first N. ``seq_len``: truncate (and for text, pad) to T."""
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"{path}: no such file")
    if path.is_dir():
        raise SurgeryError(f"{path}: is a folder; pass a data file (.safetensors, .pt, .npz or a text file)")
    require_regular_file(path, "data file (.safetensors, .pt, .npz or a text file)")
    if samples is not None and samples < 1:
        raise SurgeryError(f"{path}: samples must be at least 1, got {samples}")
    if seq_len is not None and seq_len < 1:
        raise SurgeryError(f"{path}: seq_len must be at least 1, got {seq_len}")
    if path.suffix.lower() in TENSOR_SUFFIXES:
        data = dataset_from_tensors(path, read_tensors(path))
        if seq_len is not None and data.is_tokens:
            data.input_ids = data.input_ids[:, :seq_len]
            if data.attention_mask is not None:
                data.attention_mask = data.attention_mask[:, :seq_len]
            if data.labels is not None and data.labels.dim() == 2:
                data.labels = data.labels[:, :seq_len]
    else:
        data = read_text(path, tokenizer, seq_len)
    if samples is not None:
        if samples > len(data):
            raise SurgeryError(f"{path}: asked for {samples} samples but the file holds {len(data)}")
        data = data.select(slice(0, samples))
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The named tensors of a .safetensors, .pt/.pth/.bin (weights only) or .npz file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except SurgeryError:
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"{path}: not a readable {suffix} data file ({reason[:200]})") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SurgeryError(f"{path}: expected a dict of named tensors ({', '.join(KNOWN_KEYS)}), "
                           f"found {type(obj).__name__}")
    for name, t in obj.items():
        check_dense(t, str(name), path)
    return obj


def dataset_from_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Dataset:
    """Validate names, dtypes and shapes of the tensors and wrap them."""
    found = ", ".join(sorted(tensors)) or "nothing"
    if ("inputs" in tensors) == ("input_ids" in tensors):
        problem = "both 'inputs' and 'input_ids'" if tensors.keys() >= {"inputs", "input_ids"} else \
            "no 'inputs' or 'input_ids' tensor"
        raise SurgeryError(f"{path}: holds {problem} (found: {found})")
    ids, inputs = tensors.get("input_ids"), tensors.get("inputs")
    mask, labels = tensors.get("attention_mask"), tensors.get("labels")
    main = ids if ids is not None else inputs
    name = "input_ids" if ids is not None else "inputs"
    if main.dim() < 2 or len(main) == 0:
        raise SurgeryError(f"{path}: tensor '{name}' has shape {list(main.shape)}; expected [samples, ...] "
                           "with at least one sample")
    if ids is not None:
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise SurgeryError(f"{path}: tensor 'input_ids' must be integer [samples, tokens], "
                               f"got {ids.dtype} {list(ids.shape)}")
        ids = ids.long()
        if mask is not None:
            if tuple(mask.shape) != tuple(ids.shape):
                raise SurgeryError(f"{path}: tensor 'attention_mask' has shape {list(mask.shape)}, "
                                   f"'input_ids' has {list(ids.shape)}")
            mask = mask.long()
    elif mask is not None:
        raise SurgeryError(f"{path}: tensor 'attention_mask' comes with 'input_ids', not with 'inputs'")
    if labels is not None:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise SurgeryError(f"{path}: tensor 'labels' must hold integer class indices, got {labels.dtype}")
        if labels.dim() == 0 or len(labels) != len(main):
            raise SurgeryError(f"{path}: tensor 'labels' has {list(labels.shape)}, expected {len(main)} samples")
        labels = labels.long()
    if inputs is not None and inputs.dtype.is_floating_point:
        inputs = inputs.float()  # numpy writes float64; models run in float32 (evaluate casts further)
    return Dataset(str(path), inputs=inputs, input_ids=ids, attention_mask=mask, labels=labels)


def tokenizer_path(tokenizer: str | Path) -> Path:
    p = Path(tokenizer)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise SurgeryError(f"{file}: no tokenizer.json here; pass the model folder that holds it")
    require_regular_file(file, "tokenizer.json")
    return file


def pad_id(tok) -> int:
    """The tokenizer's padding id: its padding config, a [PAD]/<pad> token, else 0."""
    if tok.padding and tok.padding.get("pad_id") is not None:
        return int(tok.padding["pad_id"])
    for t in PAD_TOKENS:
        if tok.token_to_id(t) is not None:
            return tok.token_to_id(t)
    return 0


def read_text(path: Path, tokenizer: str | Path | None, seq_len: int | None) -> Dataset:
    """One sample a non-empty line, tokenized, truncated to ``seq_len`` and right-padded."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        raise SurgeryError(f"{path}: unknown data format (expected .safetensors, .pt, .pth, .bin, .npz or text)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SurgeryError(f"{path}: text is not UTF-8 ({e.reason} at byte {e.start})") from e
    if tokenizer is None:
        raise SurgeryError(f"{path} is text; calibrating on text needs the model folder's tokenizer.json "
                           "(pass the model folder as the tokenizer)")
    from tokenizers import Tokenizer

    file = tokenizer_path(tokenizer)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:
        raise SurgeryError(f"{file}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from e
    tok.no_padding()
    tok.no_truncation()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise SurgeryError(f"{path}: text file has no samples (no non-empty lines)")
    encoded = [e.ids for e in tok.encode_batch(lines)]
    if any(not ids for ids in encoded):
        raise SurgeryError(f"{path}: line {next(i for i, e in enumerate(encoded) if not e) + 1} gives no tokens")
    width = seq_len or max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id(tok), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        e = e[:width]
        ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[row, : len(e)] = 1
    return Dataset(str(path), input_ids=ids, attention_mask=mask)


# ----- fitting a model --------------------------------------------------------------------------
def check_fits(family, dataset: Dataset) -> None:
    """Raise SurgeryError when ``dataset`` cannot be fed to ``family``'s model: token ids against
    feature inputs, feature width, token ids beyond the vocabulary, sequences beyond the positions."""
    names = family.input_names()
    if ("input_ids" in names) != dataset.is_tokens:
        dataset.model_inputs(family)  # raises the token/feature mismatch message
    if dataset.is_tokens:
        ids = dataset.input_ids
        vocab = getattr(family, "vocab_size", None) or family.config.get("vocab_size")
        if ids.numel() and int(ids.min()) < 0:
            raise SurgeryError(f"{dataset.source}: token id {int(ids.min())} is negative")
        if vocab and ids.numel() and int(ids.max()) >= vocab:
            raise SurgeryError(f"{dataset.source}: token id {int(ids.max())} is beyond the {family.name} model's "
                               f"vocabulary of {vocab}")
        positions = family.config.get("n_positions") or family.config.get("max_position_embeddings")
        if positions and ids.shape[1] > positions:
            raise SurgeryError(f"{dataset.source}: sequences of {ids.shape[1]} tokens are longer than the "
                               f"{family.name} model's {positions} positions (pass a shorter seq_len)")
        return
    try:
        example = family.example_inputs(batch=1)
    except SurgeryError:
        return  # the family does not know its input shape; the forward pass will tell
    expected = next(v for k, v in example.items() if k in names)
    want, have = math.prod(expected.shape[1:]), math.prod(dataset.inputs.shape[1:])
    if want != have:
        raise SurgeryError(f"{dataset.source}: samples of shape {list(dataset.inputs.shape[1:])} ({have} values) "
                           f"do not fit the {family.name} model, which takes {list(expected.shape[1:])} ({want})")
