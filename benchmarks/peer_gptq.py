"""The GPTQ peer of bench_quantize_peers.py: GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers") as GPTQModel runs it on CPU.

GPTQModel's own pipeline quantizes the float model (``GPTQModel.load`` + ``quantize`` on the shared
calibration rows, ``QuantizeConfig`` at its defaults: damp 0.05, true sequential, symmetric; group
rows keep its group-aware reordering, per-channel rows turn it off because GPTQModel refuses it without
groups) and saves a GPTQ folder; GPTQModel loads that folder with its pure-torch kernel, and the weights
its QuantLinear dequantizes (fp16, as the kernel multiplies with them) replace the float model's, so the
grid check and the metric see what a GPTQ runtime computes with.

GPTQModel declares torch>=2.14.1, but its pure-torch path runs on torch 2.13: install it without
dependencies as the README's Deploy section says.
"""

from __future__ import annotations

import os
from pathlib import Path


def check_shapes(layers, bits: int, group: int | None) -> None:
    """Refuse in one line what GPTQ cannot store (GPTQModel would fail deep inside, or pad a last group):
    groups that do not divide the inputs, and 3-bit codes, packed 32 to 3 int32 words, on inputs or outputs
    that are not multiples of 32."""
    for block in layers:
        for name, mod in block.named_modules():
            kind = type(mod).__name__
            if kind not in ("Linear", "Conv1D"):
                continue
            rows, inputs = mod.weight.shape[::-1] if kind == "Conv1D" else mod.weight.shape
            if group and inputs % group:
                raise RuntimeError(f"{name}: group size {group} does not divide its {inputs} inputs")
            if bits == 3 and (inputs % 32 or rows % 32):
                raise RuntimeError(f"{name} [{rows}, {inputs}]: GPTQ packs 3-bit codes 32 at a time")


def run_gptq(cfg: dict):
    import torch
    from bench_quantize_peers import ROWS, blocks, calib_batches, load_float

    # GPTQModel sizes its CPU worker pool from os.cpu_count() // 2 and then asks for 2 loader workers
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))
    from gptqmodel import GPTQModel, QuantizeConfig

    bits, group = ROWS[cfg["row"]]
    out = Path(cfg["workdir"]) / f"{cfg['model']}-{cfg['row']}-gptq"
    qcfg = QuantizeConfig(bits=bits, group_size=group or -1, offload_to_disk=False,
                          **({} if group else {"act_group_aware": False}))
    model = GPTQModel.load(cfg["folder"], qcfg, device="cpu", dtype=torch.float32)
    check_shapes(blocks(model.model), bits, group)
    model.quantize(calib_batches(cfg)[: cfg["samples"]], batch_size=cfg["batch_size"], backend="gptq_torch")
    model.save(str(out))
    del model

    def dequantized():
        # GPTQModel's own reader: transformers' GPT-2 does not load GPTQ folders (its _init_weights calls
        # normal_ on the QuantLinear's weight); TorchLinear holds fp16 or bf16 scales, and the file's are fp16
        with torch._dynamo.config.patch(disable=True):  # GPTQModel would compile its dequantization
            quantized = GPTQModel.load(str(out), device="cpu", backend="gptq_torch", dtype=torch.float16)
            weights = {n: m.dequantize_weight().float() for n, m in quantized.model.named_modules()
                       if hasattr(m, "qweight")}
        if not weights:
            raise RuntimeError(f"{out}: GPTQModel quantized no Linear layer")
        model = load_float(cfg)  # only the quantized weights change: GPTQModel saves the rest in fp16
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, w in weights.items():  # [in, out]: a Conv1D's layout, a Linear's transposed
                modules[name].weight.copy_(w if type(modules[name]).__name__ == "Conv1D" else w.T)
        return model

    return dequantized
