"""align and dequantize report progress through the operations' callback: the writer's "write" task counts
up to the tensors the output holds (read back with safetensors); align's --eval runs the model twice, as
two tasks ("evaluate before", "evaluate after") that each count to the number of samples."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from modelsurgery.ops.align import AlignOptions, align_checkpoint
from modelsurgery.ops.dequantize import dequantize
from modelsurgery.ops.quantize.operation import QuantizeOptions, quantize_checkpoint
from tests.progress_record import Recorder, tensors_in

ROOT = Path(__file__).resolve().parents[2]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"



def test_align_reports_both_evaluations_and_writing(tmp_path):
    g = torch.Generator().manual_seed(0)
    head = torch.randn(6, 8, generator=g)
    head[4:] *= 3.0
    save_file({"0.weight": torch.randn(8, 4, generator=g), "0.bias": torch.randn(8, generator=g), "2.weight": head,
               "2.bias": torch.randn(6, generator=g)}, tmp_path / "m.safetensors")
    torch.save({"inputs": torch.randn(300, 4, generator=g), "labels": torch.randint(0, 6, (300,), generator=g)},
               tmp_path / "eval.pt")
    rec = Recorder()
    align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors",
                     AlignOptions(old_classes=4, eval_data=tmp_path / "eval.pt"), rec)
    assert rec.finished("evaluate before", 300) == [256, 300]  # batches of 256
    assert rec.finished("evaluate after", 300) == [256, 300]
    assert rec.finished("write", tensors_in(tmp_path / "a.safetensors")) == [0, 1, 2, 3, 4]


def test_dequantize_reports_every_tensor_written(tmp_path):
    packed = tmp_path / "packed.safetensors"
    quantize_checkpoint(MLP, packed, QuantizeOptions(method="rtn", bits=4, format="packed"))
    rec = Recorder()
    result = dequantize(packed, tmp_path / "float", progress=rec)
    n = tensors_in(tmp_path / "float")
    assert result.weights >= 1 and n == tensors_in(MLP)  # the float model's tensors, codes and scales gone
    rec.finished("write", n)
