"""LoftQ adapters (PEFT ``init_lora_weights="loftq"``): PEFT's loftq_init replaces each targeted weight W by the
dequantized bitsandbytes quantization Q (NF4 blocks of 64 with an absmax each; int8 rows with absmax / 127) and
the adapter is trained on that backbone. Fold must fold onto the backbone only: the backbone is folded as PEFT
merges it; the float model LoftQ started from is refused in one line, nothing written.

The backbones here are built as loftq_init builds them (first iteration: Q = dequant(quant(W))), the NF4 grid
from the QLoRA paper's table (Appendix E) and, where bitsandbytes is installed, from bitsandbytes itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.adapters import fold_adapters
from tests.hf_tiny import load_hf
from tests.ops.adapters.peft_helpers import build, make_adapter, outputs, peft_merged

runner = CliRunner()
TARGETS = ["q_proj", "v_proj", "down_proj"]
# QLoRA (Dettmers et al. 2023), Appendix E: the NF4 data type's 16 values
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def nf4(w: torch.Tensor) -> torch.Tensor:
    """Round to nearest NF4 code in blocks of 64 of the flattened weight, scaled by each block's absmax."""
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    idx = ((blocks / absmax)[..., None] - NF4).abs().argmin(-1)
    return (NF4[idx] * absmax).reshape(w.shape)


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True) / 127
    return (w / scale).round() * scale


def bnb_nf4(w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    return F.dequantize_4bit(q, state)


def backbone(base: Path, out: Path, quantize, dtype=torch.float32) -> Path:
    """The model LoftQ leaves behind: each targeted weight replaced by its quantized value."""
    model = load_hf(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{t}." in name for t in TARGETS) and name.endswith("weight"):
                p.copy_(quantize(p.detach().float()))
    model.to(dtype).save_pretrained(out)
    return out


def loftq_adapter(on: Path, out: Path, bits: int = 4, init=True, seed: int = 0) -> Path:
    """A trained LoRA adapter with the config PEFT's LoftQ example saves (init_lora_weights set back to true,
    loftq_config kept), or with init_lora_weights="loftq" left as it was."""
    make_adapter(on, LoraConfig(r=4, target_modules=TARGETS), out, seed=seed)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(init_lora_weights=init, loftq_config={"loftq_bits": bits, "loftq_iter": 1})
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build("llama", tmp_path_factory.mktemp("loftq") / "base")


@pytest.mark.parametrize(("bits", "quantize", "dtype"), [
    (4, nf4, torch.float32), (4, nf4, torch.bfloat16), (4, nf4, torch.float16), (8, int8_rows, torch.float32),
    (8, int8_rows, torch.float16),
])
def test_folds_onto_the_backbone_as_peft_merges(llama, tmp_path, bits, quantize, dtype):
    q = backbone(llama, tmp_path / "backbone", quantize, dtype)
    adapter = loftq_adapter(q, tmp_path / "adapter", bits)
    fold_adapters(q, [adapter], tmp_path / "folded")
    ours, reference = outputs(load_hf(tmp_path / "folded")), outputs(peft_merged(q, adapter))
    assert (reference - outputs(load_hf(q))).abs().max() > 1e-2
    tol = 1e-5 if dtype == torch.float32 else 0.05  # the folded weights are rounded to the backbone's dtype
    assert torch.allclose(ours, reference, atol=tol, rtol=0), (ours - reference).abs().max()
    with safe_open(str(tmp_path / "folded" / "model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["modelsurgery"])
    assert record["parameters"]["adapters"][0]["loftq_backbone"] == {"bits": bits, "tensors_on_grid": 9}


def test_backbone_quantized_by_bitsandbytes_is_recognised(llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    q = backbone(llama, tmp_path / "backbone", bnb_nf4)
    adapter = loftq_adapter(q, tmp_path / "adapter")
    fold_adapters(q, [adapter], tmp_path / "folded")
    ours, reference = outputs(load_hf(tmp_path / "folded")), outputs(peft_merged(q, adapter))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("bits", "init"), [(4, True), (4, "loftq"), (8, True)])
def test_refuses_the_float_model(llama, tmp_path, bits, init):
    """The adapter trained on the backbone, folded onto the float model LoftQ started from: refused."""
    q = backbone(llama, tmp_path / "backbone", nf4 if bits == 4 else int8_rows)
    adapter = loftq_adapter(q, tmp_path / "adapter", bits, init=init)
    result = runner.invoke(app, ["fold", str(llama), str(adapter), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(adapter) in lines[0] and "LoftQ's quantized backbone" in lines[0], lines[0]
    assert re.search(r"tensor 'model\.layers\.0\.(self_attn|mlp)\.\w+_proj\.weight'", lines[0]), lines[0]
    assert f"({bits}-bit)" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_refuses_loftq_after_an_adapter_that_moves_its_weights(llama, tmp_path):
    q = backbone(llama, tmp_path / "backbone", nf4)
    adapter = loftq_adapter(q, tmp_path / "loftq")
    other = make_adapter(q, LoraConfig(r=2, target_modules=["v_proj"]), tmp_path / "other", seed=3)
    with pytest.raises(SurgeryError, match="give the LoftQ adapter first"):
        fold_adapters(q, [other, adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fold_adapters(q, [adapter, other], tmp_path / "ok")  # LoftQ's first: onto the backbone
    ours, reference = outputs(load_hf(tmp_path / "ok")), outputs(peft_merged(q, adapter, other))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def test_refuses_bits_loftq_does_not_have(llama, tmp_path):
    adapter = loftq_adapter(llama, tmp_path / "adapter", bits=3)
    with pytest.raises(SurgeryError, match="loftq_bits=3: PEFT's LoftQ quantizes to 4 .NF4. or 8 bits"):
        fold_adapters(llama, [adapter], tmp_path / "out")


def test_adapter_saved_again_by_peft_is_a_plain_lora(llama, tmp_path):
    """PEFT loading a config whose init_lora_weights is not "loftq" empties its loftq_config, and saves it so:
    no LoftQ mark is left, and the adapter folds onto whatever BASE is given (as PEFT merges it)."""
    from peft import PeftModel

    adapter = loftq_adapter(llama, tmp_path / "adapter")
    PeftModel.from_pretrained(load_hf(llama), adapter).save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["loftq_config"] == {}
    fold_adapters(llama, [tmp_path / "again"], tmp_path / "folded")
    ours, reference = outputs(load_hf(tmp_path / "folded")), outputs(peft_merged(llama, tmp_path / "again"))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)
