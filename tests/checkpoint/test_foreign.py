"""Other tools' quantized checkpoints are refused by family detection, which every command that reads weights
goes through. The tensor names come from transformers' own quantizers (``serialized_names``: what each one
writes beside, or instead of, ``X.weight``), not from our table."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.checkpoint.foreign import foreign_quantization
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family, identify_family
from tests.hf_tiny import save_tiny_llama

#: transformers' quantizers (module, class) whose serialized names we read
QUANTIZERS = [("quantizer_bnb_8bit", "Bnb8BitHfQuantizer"), ("quantizer_bnb_4bit", "Bnb4BitHfQuantizer"),
              ("quantizer_compressed_tensors", "CompressedTensorsHfQuantizer"),
              ("quantizer_fbgemm_fp8", "FbgemmFp8HfQuantizer"),
              ("quantizer_finegrained_fp8", "FineGrainedFP8HfQuantizer"),
              ("quantizer_sinq", "SinqHfQuantizer"), ("quantizer_metal", "MetalHfQuantizer")]


#: words a float model's own parameters may end with: the quantizer's other names identify it
GENERIC = {"bias", "activation_scale", "scales", "meta"}


def serialized_names(module: str, cls: str) -> dict[str, list[str]]:
    quantizer = getattr(importlib.import_module(f"transformers.quantizers.{module}"), cls)
    return vars(quantizer)["serialized_names"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from safetensors.torch import load_file

    folder = save_tiny_llama(tmp_path_factory.mktemp("llama") / "m")
    return folder, load_file(folder / "model.safetensors")


@pytest.mark.parametrize("module,cls", QUANTIZERS, ids=[m.removeprefix("quantizer_") for m, _ in QUANTIZERS])
def test_every_name_another_quantizer_writes_is_refused(tmp_path, llama, module, cls):
    """Each projection stored as that quantizer stores it: the float name's companions added (the float name
    itself, where it stays, keeps float values: the names alone must say it). Every quantizer has a name of
    its own."""
    _, state = llama
    assert any(n.lstrip(".") not in GENERIC and n != p for p, names in serialized_names(module, cls).items()
               for n in names)
    for param, names in serialized_names(module, cls).items():
        param = param.lstrip(".")
        for extra in names:
            extra = extra.lstrip(".")
            if extra == param:
                continue
            out = dict(state)
            for n in [n for n in state if n.endswith(f"proj.{param}")]:
                out[n[: -len(param)] + extra] = torch.ones(2)
            path = tmp_path / f"{extra}.safetensors"
            save_file(out, str(path))
            ckpt = Checkpoint.open(path)
            if extra in GENERIC:
                continue
            with pytest.raises(SurgeryError, match=rf"{path}: tensor '[^']*{extra}' is a packed weight of another "
                                                   r"tool \(.+\); modelsurgery reads float weights"):
                detect_family(ckpt)
            assert identify_family(ckpt).name == "llama"  # inspect still describes it


def test_integer_weights_are_refused_without_any_other_sign(tmp_path, llama):
    """bitsandbytes int8 codes under the float names, scales dropped and no config: the dtype says it."""
    _, state = llama
    name = "model.layers.1.self_attn.q_proj.weight"
    out = {**state, name: torch.round(state[name] * 100).to(torch.int8)}
    save_file(out, str(tmp_path / "m.safetensors"))
    with pytest.raises(SurgeryError, match=rf"tensor '{name}' holds int8 codes, not float weights"):
        detect_family(Checkpoint.open(tmp_path / "m.safetensors"))


def test_float_and_own_formats_are_not_foreign(llama, fixtures_dir):
    folder, _ = llama
    assert foreign_quantization(Checkpoint.open(folder)) is None
    assert foreign_quantization(Checkpoint.open(fixtures_dir / "digits" / "mlp_seed0.safetensors")) is None


def test_inspect_describes_what_the_other_commands_refuse(tmp_path, llama):
    from modelsurgery.ops.inspect import inspect_checkpoint

    _, state = llama
    name = "model.layers.0.mlp.up_proj"
    save_file({**state, f"{name}.weight": state[f"{name}.weight"].to(torch.int8), f"{name}.SCB": torch.ones(56)},
              str(tmp_path / "m.safetensors"))
    report = inspect_checkpoint(tmp_path / "m.safetensors")
    assert report.family["family"] == "llama"
    assert f"'{name}.SCB'" in report.quantization["refused"] and "bitsandbytes" in report.quantization["refused"]
