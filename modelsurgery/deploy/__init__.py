"""Deployment formats that serving runtimes load: GGUF (llama.cpp), GPTQ and compressed-tensors
(transformers, vLLM). One module per format writes and reads it; each converts our quantized
representation (codes, scale, zero point) without re-quantizing.

``check_scheme`` refuses a scheme a format cannot hold before anything runs; ``storable_scale``
gives the scale a format stores exactly, so a quantizer can learn on it; ``deploy`` writes a
quantized model; ``convert_packed`` converts a ``surgery quantize --format packed`` checkpoint;
``read_deployed`` reads a GPTQ or compressed-tensors folder back into our representation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelsurgery.checkpoint import PlannedTensor, plan_copy
from modelsurgery.deploy import compressed_tensors, gguf, gptq
from modelsurgery.deploy.common import DeployReport, DeploySource, linear_refusal, open_packed, weight_from_quantized
from modelsurgery.errors import SurgeryError

#: --format name -> the module that owns it
FORMATS = {gguf.NAME: gguf, gptq.NAME: gptq, compressed_tensors.NAME: compressed_tensors}


def format_module(fmt: str):
    if fmt not in FORMATS:
        raise SurgeryError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def writes_folder(fmt: str) -> bool:
    """Whether ``fmt`` is written as a model folder (else one file)."""
    return format_module(fmt).FOLDER


def check_scheme(fmt: str, scheme) -> None:
    """One-line refusal of a scheme ``fmt`` cannot hold (call before calibration)."""
    format_module(fmt).check_scheme(scheme)


def check_model(fmt: str, config: dict | None, folder: Path | None, where: str, gguf_tokenizer: str = "auto") -> None:
    """Model-level checks that need no weights (GGUF: architecture, rope, tokenizer)."""
    if fmt == gguf.NAME:
        gguf.check_model(config or {}, where)
        gguf.check_tokenizer(folder, gguf_tokenizer)


def check_weight(fmt: str, name: str, shape: tuple[int, ...], transposed: bool, embedding: bool, scheme,
                 in_block: bool = True) -> None:
    """One-line refusal of a weight ``fmt`` cannot hold (call before calibration); ``in_block``: whether
    the weight lies inside the family's blocks."""
    if why := linear_refusal(name, shape, transposed, fmt):
        raise SurgeryError(why)
    if embedding and fmt != gguf.NAME:
        raise SurgeryError(f"tensor '{name}': --format {fmt} quantizes Linear layers, not embedding tables "
                           "(drop --no-default-skips or --skip it)")
    if fmt == gptq.NAME:
        gptq.check_in_block(name, in_block)
        gptq.check_shape(name, shape, scheme.bits)


def storable_grid(fmt: str, scale: torch.Tensor, zero: torch.Tensor, scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid ``fmt`` stores exactly: the zero point it can hold (GPTQ v1: >= 1), then the scale."""
    module = format_module(fmt)
    if module is gptq:
        zero = zero.clamp(min=gptq.min_zero_point(scheme))
    return storable_scale(fmt, scale, zero, scheme), zero


def storage_dtype(fmt: str, ckpt) -> str | None:
    """The dtype ``fmt`` keeps scales in when it is the model's own (compressed-tensors), else None."""
    if format_module(fmt) is compressed_tensors:
        return str(compressed_tensors.model_dtype(ckpt)).removeprefix("torch.")
    return None


def storable_scale(fmt: str, scale: torch.Tensor, zero: torch.Tensor, scheme) -> torch.Tensor:
    """The scale ``fmt`` stores exactly (fp16; Q4_1 also its fp16 offset -z * s; compressed-tensors: the
    model's dtype, ``scheme.storage_dtype``)."""
    from modelsurgery.deploy.common import storable_scale as fp16_scale

    module = format_module(fmt)
    if module is compressed_tensors:
        dtype = getattr(torch, scheme.storage_dtype or "float32")
        if dtype == torch.float16:
            return fp16_scale(scale, zero)
        if dtype == torch.bfloat16:  # float32's range: only the significand shortens
            return scale.float().clamp(min=torch.finfo(dtype).tiny).to(dtype).float()
        return scale  # float32 models keep it as learned
    return fp16_scale(scale, zero, module.stores_offset(scheme))


def deploy(src: DeploySource, out: str | Path, fmt: str, force: bool = False,
           gguf_tokenizer: str = "auto") -> DeployReport:
    """Write ``src`` in ``fmt`` (atomic; refuses an existing output without ``force``)."""
    module = format_module(fmt)
    module.check_scheme(src.scheme)
    if module is gguf:
        return gguf.write_gguf(src, out, force, gguf_tokenizer)
    if module is gptq:
        return gptq.write_gptq(src, out, force)
    return compressed_tensors.write_compressed_tensors(src, out, force)


def convert_packed(path: str | Path, out: str | Path, fmt: str, force: bool = False,
                   gguf_tokenizer: str = "auto") -> DeployReport:
    """A packed checkpoint (``surgery quantize --format packed``) converted to ``fmt``. Scales are
    rounded to what the format stores; the report's ``max_scale_rounding_error`` says by how much
    the weights moved (0 when the checkpoint was quantized for the format)."""
    format_module(fmt)
    return deploy(open_packed(path), out, fmt, force, gguf_tokenizer)


def read_deployed(ckpt) -> list | None:
    """The quantized weights of a GPTQ or compressed-tensors folder, or None for any other checkpoint."""
    if gptq.is_gptq(ckpt.config):
        return gptq.read_gptq(ckpt)
    if compressed_tensors.is_compressed_tensors(ckpt.config):
        return compressed_tensors.read_compressed_tensors(ckpt)
    return None


def deployed_planned(ckpt, weights: list, dtype: torch.dtype = torch.float32) -> list[PlannedTensor]:
    """The float tensors a GPTQ or compressed-tensors folder stands for, each made when written: the
    tensors no module owns as they are, then every module's dequantized ``X.weight``."""
    suffixes = gptq.SUFFIXES if gptq.is_gptq(ckpt.config) else compressed_tensors.SUFFIXES
    owned = {w.name[: -len(".weight")] + s for w in weights for s in suffixes}
    kept = [plan_copy(ckpt, k) for k in ckpt.keys() if k not in owned]  # noqa: SIM118
    return kept + [PlannedTensor(w.name, tuple(w.shape), dtype, lambda w=w: w.dequantize(dtype)) for w in weights]


def deployed_state(ckpt, weights: list, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The float state dict a GPTQ or compressed-tensors folder stands for: each module's stored
    tensors replaced by its dequantized ``X.weight`` (as ``packing.dequantized_state`` does for packed)."""
    return {t.name: t.load() for t in deployed_planned(ckpt, weights, dtype)}


__all__ = ["FORMATS", "DeployReport", "DeploySource", "check_model", "check_scheme", "check_weight",
           "convert_packed", "deploy", "deployed_planned", "deployed_state", "read_deployed", "storable_grid",
           "storable_scale", "storage_dtype",
           "weight_from_quantized", "writes_folder"]
