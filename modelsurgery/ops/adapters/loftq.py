"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", Alg. 1) as
PEFT's ``init_lora_weights="loftq"`` applies it (``peft/utils/loftq_utils.py``, ``loftq_init``): each targeted
weight W is replaced in the base model by Q, the dequantized bitsandbytes quantization of W (after
``loftq_iter`` > 1 alternations, of W less the previous low-rank part), and the adapter starts at the
rank-r SVD factors of W - Q. The model PEFT's LoftQ example saves beside the adapter
(its "backbone") holds Q; the trained adapter is relative to Q, so folding it is right only onto the backbone,
never onto the float model LoftQ started from.

An adapter is LoftQ's when its config says ``init_lora_weights: "loftq"`` or has a ``loftq_config`` with
``loftq_bits`` (PEFT's example sets init_lora_weights back to true before saving, and keeps loftq_config).
The backbone is recognised by its values, which lie on the quantizer's grid:

- 4 bits, NF4 (Dettmers et al. 2023, QLoRA, Appendix E; bitsandbytes ``Params4bit``, blocksize 64, a float32
  absmax per block): the weight as stored, flattened, in blocks of 64 values; each value divided by its
  block's largest magnitude is one of NF4's 16 codes (the largest is the code 1.0 times absmax itself);
- 8 bits (bitsandbytes ``Int8Params``, absmax per row): each value is a whole multiple of its row's largest
  magnitude / 127.

Both within the rounding of the stored dtype (the backbone is saved in the model's dtype). A float weight
misses the grid at almost every value, so a few blocks of each targeted weight decide.
"""

from __future__ import annotations

import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError

#: NF4's 16 codes (QLoRA Appendix E; bitsandbytes ``get_4bit_type("nf4")``)
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
NF4_BLOCK = 64  # bitsandbytes Params4bit's default blocksize, which PEFT's loftq_init uses
INT8_LEVELS = 127
SUPPORTED_BITS = (4, 8)  # loftq_init: "Only nf4 and int8 quantization is supported"
CHECKED_VALUES = 64 * NF4_BLOCK  # values read from the start of each weight (an int8 check rounds up to whole rows)


def loftq_bits(config: dict) -> int | None:
    """The bit width of a LoftQ adapter (PEFT's LoftQConfig default: 4); None when it is not one."""
    loftq = config.get("loftq_config") or {}
    if not (str(config.get("init_lora_weights")).lower() == "loftq" or (isinstance(loftq, dict) and loftq)):
        return None
    bits = loftq.get("loftq_bits", 4) if isinstance(loftq, dict) else 4
    return int(bits) if isinstance(bits, (int, float)) and not isinstance(bits, bool) else -1


def off_grid(weight: torch.Tensor, bits: int) -> str | None:
    """Why ``weight`` (as stored) is not a LoftQ backbone weight of ``bits`` bits; None when it is."""
    eps = torch.finfo(weight.dtype).eps if weight.dtype.is_floating_point else 0.0
    if bits == 4:
        flat = weight.reshape(-1)[:CHECKED_VALUES].float()
        usable = flat.numel() - flat.numel() % NF4_BLOCK or flat.numel()
        blocks = flat[:usable].reshape(-1, min(NF4_BLOCK, usable))
        ratio = blocks / blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        miss = (ratio[..., None] - torch.tensor(NF4_CODES)).abs().amin(-1)
        # two roundings to the stored dtype (the value and the block's absmax), each within eps/2 relative
        bad = miss > 2 * eps * (1 + ratio.abs()) + 1e-6
        what = "NF4 codes times its 64-value block's absmax"
    else:
        rows = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
        rows = rows[:max(1, CHECKED_VALUES // max(1, rows.shape[1]))].float()
        q = rows / rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * INT8_LEVELS
        tol = 2 * eps * (1 + q.abs()) + 1e-4
        informative = tol < 0.25  # where the dtype's rounding is finer than the grid
        if int(informative.sum()) < 16:
            return f"too few values are stored finely enough ({weight.dtype}) to tell an int8 grid"
        bad = ((q - q.round()).abs() > tol) & informative
        what = "whole multiples of its row's absmax / 127"
    if bool(bad.any()):
        share = float(bad.float().mean())
        return f"{share:.0%} of the values checked are not {what}"
    return None


def check_backbone(base: Checkpoint, names: list[str], bits: int, where: str) -> None:
    """Refuse unless each of ``names`` (BASE tensors a LoftQ adapter updates) lies on the ``bits`` grid:
    the adapter at ``where`` would be folded onto weights it was not trained on."""
    if bits not in SUPPORTED_BITS:
        raise SurgeryError(f"{where}: loftq_config loftq_bits={bits}: PEFT's LoftQ quantizes to 4 (NF4) or 8 bits")
    for name in names:
        why = off_grid(base.get(name), bits)
        if why is not None:
            raise SurgeryError(
                f"{where}: a LoftQ adapter ({bits}-bit) is trained on LoftQ's quantized backbone (the base model "
                f"PEFT's LoftQ init saved beside it), but BASE {base.path} is not that model: tensor '{name}': {why}; "
                "fold it onto the backbone"
            )
