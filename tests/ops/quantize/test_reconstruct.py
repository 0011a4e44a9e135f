"""Block reconstruction's memory contract: no float copy of the model, one copy of each quantized
weight (held by the model), and only one block's activations cached."""

from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.quantize import QuantScheme, method_by_name
from modelsurgery.ops.quantize.operation import read_data
from modelsurgery.ops.quantize.reconstruct import ReconstructOptions, find_targets, reconstruct_blocks

ROOT = Path(__file__).resolve().parents[3]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
CALIB = ROOT / "fixtures" / "data" / "digits_calib.safetensors"


def test_quantized_weights_live_once_in_the_model_and_one_block_is_cached():
    family = detect_family(Checkpoint.open(MLP))
    model = family.build_module()
    float_outputs = {}
    calib = list(read_data(CALIB, family, None, 64, None, model).batches(32, family))
    stages = model.stages()
    with torch.no_grad():  # each block's float output on the float model's own inputs
        h = [stages.embed(**b)[0] for b in calib]
        for i, block in enumerate(stages.blocks):
            h = [block(x) for x in h]
            float_outputs[i] = h
    targets = find_targets(model)
    result = reconstruct_blocks(model, targets, calib, QuantScheme(3), method_by_name("flexround"),
                                ReconstructOptions(settings={"steps": 5}))
    params = dict(model.named_parameters())
    assert set(result.weights) == {"0.weight", "2.weight", "4.weight"}
    for name, qw in result.weights.items():
        assert torch.equal(params[name], qw.dequantized)
        assert qw.dequantized.untyped_storage().data_ptr() == params[name].untyped_storage().data_ptr()
    inputs = sum(b["input"].flatten(1).nbytes for b in calib)
    for i, block in enumerate(result.blocks):  # the quantized input and the float target, nothing more
        target = sum(y.nbytes for y in float_outputs[i])
        block_input = inputs if i == 0 else sum(y.nbytes for y in float_outputs[i - 1])
        assert block.cached_bytes == block_input + target, i
