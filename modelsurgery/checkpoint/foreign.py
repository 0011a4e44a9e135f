"""Other tools' quantized checkpoints, recognised from their tensors so that no command reads their integer
codes as float weights (family detection refuses them: ``families.detect_family``).

bitsandbytes keeps int8 codes under the float name (``q_proj.weight``) with the row scales beside it
(``q_proj.SCB``); GPTQ, AWQ, HQQ, EETQ, quanto, fine-grained FP8 and compressed-tensors store codes, scales and
zero points under names of their own. The endings below are those transformers' quantizers read back (their
``serialized_names``), less the ones modelsurgery's own packed format writes (``.qweight``, ``.scale``,
``.zero_point``: ``ops.quantize.packing``) and words a float model's own parameters may end with (``.bias``,
``.scales``, ``.meta``, ``.activation_scale``: the same tools' other names say it). Where the names say
nothing, integer ``.weight`` tensors do: a weight stored as integers is codes whatever wrote it. Header-only:
no tensor is read, torch is not imported.
"""

from __future__ import annotations

from modelsurgery.checkpoint.store import Checkpoint

#: tensor-name endings only another tool's quantized layout writes -> the tool
FOREIGN_SUFFIXES: dict[str, str] = {
    ".SCB": "bitsandbytes 8-bit",
    ".weight_format": "bitsandbytes 8-bit",
    ".absmax": "bitsandbytes 4-bit",
    ".quant_map": "bitsandbytes 4-bit",
    ".nested_absmax": "bitsandbytes 4-bit",
    ".nested_quant_map": "bitsandbytes 4-bit",
    ".quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit",
    ".quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit",
    ".qzeros": "GPTQ/AWQ",
    ".g_idx": "GPTQ",
    ".qbiases": "Metal",
    ".weight_packed": "compressed-tensors",
    ".weight_scale": "compressed-tensors/FP8",
    ".weight_zero_point": "compressed-tensors",
    ".weight_global_scale": "compressed-tensors",
    ".weight_shape": "compressed-tensors",
    ".weight_scale_inv": "fine-grained FP8",
    ".W_q": "HQQ/SINQ",
    ".weight_scales": "EETQ",
    ".weight._data": "quanto",
    ".weight._scale": "quanto",
    ".codebooks": "AQLM",
    "_proj_blocks": "MXFP4",
}


def _integer(dtype_name: str) -> bool:
    return dtype_name.startswith(("int", "uint")) or dtype_name == "bool"


def foreign_quantization(ckpt: Checkpoint) -> str | None:
    """What says that ``ckpt`` holds another tool's quantized weights ("tensor 'X.SCB' (bitsandbytes 8-bit)"),
    or None. modelsurgery's own packed and fake formats never match (their codes are ``.qweight``)."""
    name = next((n for n in ckpt.infos if n.endswith(tuple(FOREIGN_SUFFIXES))), None)
    if name is not None:
        tool = next(t for s, t in FOREIGN_SUFFIXES.items() if name.endswith(s))
        return f"tensor '{name}' is a packed weight of another tool ({tool})"
    name = next((n for n, i in ckpt.infos.items() if n.endswith(".weight") and _integer(i.dtype_name)), None)
    if name is not None:
        return f"tensor '{name}' holds {ckpt.infos[name].dtype_name} codes, not float weights"
    return None
