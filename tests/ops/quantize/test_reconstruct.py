"""Block reconstruction's memory contract: no float copy of the model, one copy of each quantized
weight (held by the model), and only one block's activations cached."""

from pathlib import Path

import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.quantize import QuantScheme, method_by_name
from modelsurgery.ops.quantize.operation import read_data
from modelsurgery.ops.quantize.reconstruct import (
    ReconstructOptions,
    feature_dim,
    find_targets,
    rec_loss,
    reconstruct_blocks,
)

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


def brecq_lp_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """BRECQ's and FlexRound's reconstruction loss as their code writes it (quant/loss.py ``lp_loss``,
    p = 2, reduction 'none'): squared error summed over dim 1, averaged over the rest."""
    return (pred - tgt).abs().pow(2).sum(1).mean()


def test_reconstruction_loss_is_summed_over_features_only():
    g = torch.Generator().manual_seed(0)
    # conv block [N, C, H, W] and MLP [N, C]: the reference's own layouts, channel axis 1
    for shape in ((4, 6, 5, 5), (8, 10)):
        out, tgt = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        assert torch.allclose(rec_loss(out, tgt, None, 1), brecq_lp_loss(out, tgt))
    # transformer [B, T, C]: features last, i.e. the reference loss on [B * T, C]
    out, tgt = torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    assert torch.allclose(rec_loss(out, tgt), brecq_lp_loss(out.reshape(-1, 16), tgt.reshape(-1, 16)))
    # so a longer sequence of the same positions weighs the same against a regulariser
    assert torch.allclose(rec_loss(torch.cat([out, out], 1), torch.cat([tgt, tgt], 1)), rec_loss(out, tgt))
    # padding positions are left out of the mean
    pad = torch.randn(3, 2, 16, generator=g)
    mask = torch.cat([torch.ones(3, 7), torch.zeros(3, 2)], 1)
    assert torch.allclose(rec_loss(torch.cat([out, pad], 1), torch.cat([tgt, -pad], 1), mask), rec_loss(out, tgt))


def test_feature_axis_follows_the_layers_of_the_block():
    assert feature_dim(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())) == 1
    assert feature_dim(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU())) == -1
