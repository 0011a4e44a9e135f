"""`surgery quantize --format gptq` folders loaded by transformers through optimum and GPTQModel on CPU
(GPTQModel's pure-torch kernel, ``backend="gptq_torch"``): its own QuantLinear unpacking returns our
weights, and its logits match transformers' LLaMA holding the weights of ``surgery dequantize``.

GPTQModel declares torch>=2.14.1 but its pure-torch path runs on torch 2.13; install it without its
dependencies as the README says (Deploy, "How each is verified"). Skipped when it is not installed;
slow (the GPTQModel import and eight model loads take about a minute): run with ``-m slow``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.deploy.conftest import LLAMA

runner = CliRunner()

# bits, symmetric, group size (None: per channel), what stays float: GPTQ packs codes into int32 words
# along both dimensions, so the 176-wide MLP cannot hold 3-bit codes, and 176 inputs do not split into
# groups of 32
SCHEMES = {
    "w4-channel-sym": (4, True, None, []),
    "w4-channel-asym": (4, False, None, []),
    "w4-g32-sym": (4, True, 32, ["down_proj"]),
    "w4-g32-asym": (4, False, 32, ["down_proj"]),
    "w3-channel-sym": (3, True, None, ["mlp"]),
    "w3-channel-asym": (3, False, None, ["mlp"]),
    "w3-g32-sym": (3, True, 32, ["mlp"]),
    "w3-g32-asym": (3, False, 32, ["mlp"]),
}


def surgery(*args: str) -> None:
    res = runner.invoke(app, [*args, "-q"])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module", params=list(SCHEMES))
def folders(request, tmp_path_factory):
    """A GPTQ folder quantized by surgery, and its `surgery dequantize` float twin."""
    bits, symmetric, group, skip = SCHEMES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    args = ["quantize", str(LLAMA), "-o", str(root / "gptq"), "--format", "gptq", "--method", "rtn",
            "--bits", str(bits), "--symmetric" if symmetric else "--asymmetric"]
    args += ["--granularity", "group", "--group-size", str(group)] if group else ["--granularity", "channel"]
    for pattern in skip:
        args += ["--skip", pattern]
    surgery(*args)
    surgery("dequantize", str(root / "gptq"), "-o", str(root / "float"))
    return bits, root / "gptq", root / "float"


def load_with_gptqmodel(folder, bits):
    """transformers -> optimum -> GPTQModel's TorchLinear, eager (torch.compile off: GPTQModel compiles
    its dequantization with inductor on first use, which only costs time here)."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu",
                                                quantization_config=GPTQConfig(bits=bits, backend="gptq_torch")).eval()


@pytest.mark.slow
def test_gptqmodel_loads_our_weights_and_logits(folders, token_ids):
    from transformers import AutoModelForCausalLM

    bits, gptq, floats = folders
    ours = load_file(floats / "model.safetensors")
    quantized = [m for group in json.loads((gptq / "config.json").read_text())["quantization_config"]
                 ["modules_in_block_to_quantize"] for m in group]
    with torch._dynamo.config.patch(disable=True):
        model = load_with_gptqmodel(gptq, bits)
        replaced = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}
        # exactly the modules surgery quantized became QuantLinears; the float ones stayed nn.Linear
        assert set(replaced) == {n for n, _ in model.named_modules() if any(n.endswith("." + q) for q in quantized)}
        assert replaced and all(type(m).__name__ == "TorchLinear" for m in replaced.values())
        for name, module in replaced.items():
            # GPTQModel dequantizes in the fp16 of the scales: fp16(scale * (q - zero)), one rounding of
            # our exact (q - zero) * scale
            theirs = module.dequantize_weight().T
            assert theirs.dtype == torch.float16
            assert torch.equal(theirs, ours[f"{name}.weight"].half()), name
        with torch.no_grad():
            logits = model(token_ids).logits
    reference = AutoModelForCausalLM.from_pretrained(floats).eval()
    state = reference.state_dict()
    for name in replaced:
        state[f"{name}.weight"] = state[f"{name}.weight"].half().float()  # the weights GPTQModel multiplies by
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = reference(token_ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # and the fp16 rounding of the weights moves the logits of our exact dequantized forward only slightly
    with torch.no_grad():
        exact = AutoModelForCausalLM.from_pretrained(floats).eval()(token_ids).logits
    assert (logits - exact).abs().max() < 2e-2 * exact.abs().max()


@pytest.mark.parametrize("skip,expected", [
    ("o_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj"]),
    ("model.layers.0.self_attn.o_proj.weight", None),  # blocks differ: full module names
])
def test_float_linears_are_left_out_of_modules_in_block_to_quantize(tmp_path, skip, expected):
    """optimum (transformers' GPTQ loader) replaces every Linear of every block whose name ends with an
    entry of modules_in_block_to_quantize, or every one when it is null: a Linear kept float must not
    match, or it is replaced by a QuantLinear without weights (the folder does not load)."""
    surgery("quantize", str(LLAMA), "-o", str(tmp_path / "m"), "--format", "gptq", "--method", "rtn", "--skip", skip)
    listed = [m for group in json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
              ["modules_in_block_to_quantize"] for m in group]
    names = list(load_file(tmp_path / "m" / "model.safetensors"))
    quantized = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
    float_linears = {n[: -len(".weight")] for n in names if n.endswith("_proj.weight")}
    assert float_linears and quantized
    for module in quantized | float_linears:
        assert any(module.endswith(entry) for entry in listed) == (module in quantized), module
    if expected is not None:
        assert sorted(listed) == sorted(expected)
    else:
        assert sorted(listed) == sorted(quantized)


@pytest.mark.slow
def test_bert_folder_loads_in_transformers(tmp_path):
    """optimum finds the blocks by a list of decoder prefixes ('model.layers', 'transformer.h', ...), which
    BERT's 'encoder.layer' is not in: the folder names its blocks (block_name_to_quantize), and transformers
    loads it with every quantized Linear replaced, computing the dequantized model (weights in fp16, as
    GPTQModel multiplies)."""
    from transformers import AutoModel

    from tests.hf_tiny import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "bert")
    surgery("quantize", str(folder), "-o", str(tmp_path / "gptq"), "--format", "gptq", "--method", "rtn")
    surgery("dequantize", str(tmp_path / "gptq"), "-o", str(tmp_path / "float"))
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import GPTQConfig

    with torch._dynamo.config.patch(disable=True):
        model = AutoModel.from_pretrained(tmp_path / "gptq", device_map="cpu",
                                          quantization_config=GPTQConfig(bits=4, backend="gptq_torch")).eval()
        replaced = [n for n, m in model.named_modules() if hasattr(m, "qweight")]
        reference = AutoModel.from_pretrained(tmp_path / "float").eval()
        state = reference.state_dict()
        for name in replaced:
            state[f"{name}.weight"] = state[f"{name}.weight"].half().float()
        reference.load_state_dict(state)
        ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            theirs, ours = model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state
    assert len(replaced) == 18  # six Linears in each of the three blocks
    torch.testing.assert_close(theirs.float(), ours, rtol=1e-4, atol=1e-4)
