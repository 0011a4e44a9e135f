"""Bad input: a one-line SurgeryError naming the file, and nothing written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.errors import SurgeryError
from modelsurgery.export import ExportOptions, export_checkpoint


def mlp_file(path):
    torch.manual_seed(0)
    save_file({"0.weight": torch.randn(8, 4), "0.bias": torch.randn(8), "2.weight": torch.randn(3, 8)}, str(path))
    return path


def assert_nothing_written(folder, expected: set[str]):
    assert {p.name for p in folder.iterdir()} == expected  # no output, no temporary folder left behind


def test_unknown_family_without_model(tmp_path):
    src = tmp_path / "odd.safetensors"
    save_file({"encoder.blob": torch.randn(3, 4, 5), "scalar": torch.tensor(1.0)}, str(src))
    with pytest.raises(SurgeryError,
                       match=r"odd\.safetensors: no known model family.*--model package\.module:function"):
        export_checkpoint(src, tmp_path / "o.onnx")
    assert_nothing_written(tmp_path, {"odd.safetensors"})


def test_existing_output_needs_force(tmp_path):
    src = mlp_file(tmp_path / "m.safetensors")
    (tmp_path / "o.onnx").write_bytes(b"keep me")
    with pytest.raises(SurgeryError, match=r"o\.onnx: already exists \(use --force"):
        export_checkpoint(src, tmp_path / "o.onnx")
    assert (tmp_path / "o.onnx").read_bytes() == b"keep me"
    export_checkpoint(src, tmp_path / "o.onnx", ExportOptions(force=True))
    assert (tmp_path / "o.onnx").stat().st_size > 100


@pytest.mark.parametrize("options,message", [
    (ExportOptions(dtype="bf16"), r"--dtype bf16: expected one of fp32, fp16"),
    (ExportOptions(opset=9), r"--opset 9 is outside 13\.\."),
])
def test_bad_options(tmp_path, options, message):
    src = mlp_file(tmp_path / "m.safetensors")
    with pytest.raises(SurgeryError, match=message):
        export_checkpoint(src, tmp_path / "o.onnx", options)
    assert_nothing_written(tmp_path, {"m.safetensors"})


def test_output_must_be_onnx(tmp_path):
    src = mlp_file(tmp_path / "m.safetensors")
    with pytest.raises(SurgeryError, match=r"o\.bin: the output must be a \.onnx file"):
        export_checkpoint(src, tmp_path / "o.bin")
    assert_nothing_written(tmp_path, {"m.safetensors"})


def test_failed_check_writes_nothing(tmp_path):
    src = mlp_file(tmp_path / "m.safetensors")
    # fp16 rounding makes ORT and torch differ by more than zero on these random weights
    with pytest.raises(SurgeryError, match=r"o\.onnx: ONNX Runtime differs from torch by .* nothing was written"):
        export_checkpoint(src, tmp_path / "o.onnx", ExportOptions(dtype="fp16", tolerance=0.0, samples=64))
    assert_nothing_written(tmp_path, {"m.safetensors"})
    report = export_checkpoint(src, tmp_path / "o.onnx", ExportOptions(dtype="fp16", tolerance=0.0, check=False))
    assert report.check is None and (tmp_path / "o.onnx").exists()


def test_missing_input(tmp_path):
    with pytest.raises(SurgeryError, match=r"nope\.safetensors: no such file"):
        export_checkpoint(tmp_path / "nope.safetensors", tmp_path / "o.onnx")
    assert_nothing_written(tmp_path, set())


def test_nan_weight_is_refused_naming_the_tensor(tmp_path):
    """Issue #14 item 9: a NaN model exported and its check reported "ok" (NaN compared to NaN)."""
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    w[2, 1] = float("nan")
    src = tmp_path / "nan.safetensors"
    save_file({"0.weight": w, "0.bias": torch.randn(8), "2.weight": torch.randn(3, 8)}, str(src))
    with pytest.raises(SurgeryError, match=r"nan\.safetensors: tensor '0\.weight' holds 1 NaN/Inf value"):
        export_checkpoint(src, tmp_path / "o.onnx")
    assert_nothing_written(tmp_path, {"nan.safetensors"})


def test_check_length_beyond_the_positions_is_refused(tmp_path):
    """Issue #14 item 13: --seq-len past the position table ended in an ONNX Runtime dump."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "fixtures" / "charlm" / "gpt2"
    with pytest.raises(SurgeryError, match=r"--seq-len 100000: .*gpt2 holds positions for \d+ tokens at most"):
        export_checkpoint(src, tmp_path / "o.onnx", ExportOptions(seq_len=100000))
    assert_nothing_written(tmp_path, set())


@pytest.mark.parametrize("kind", ["gpt2", "gemma2", "qwen2"])
def test_a_classification_head_is_not_exported_as_a_language_model(tmp_path, kind):
    """transformers' ...ForSequenceClassification keeps the decoder's names plus 'score.weight' and no
    lm_head: its output is one row of class scores per sequence. Built as a causal LM with the head tied to
    the embedding, it would export (and "check") vocabulary logits of another model. Refused naming the
    tensor; nothing written."""
    import transformers

    sizes = {"vocab_size": 97, "num_labels": 3, "pad_token_id": 0}
    cfg = {"gpt2": ("GPT2Config", "GPT2ForSequenceClassification", {"n_embd": 32, "n_layer": 2, "n_head": 4,
                                                                      "bos_token_id": 1, "eos_token_id": 1}),
           "gemma2": ("Gemma2Config", "Gemma2ForSequenceClassification", {
               "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 8}),
           "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", {
               "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "tie_word_embeddings": True})}[kind]
    torch.manual_seed(0)
    model = getattr(transformers, cfg[1])(getattr(transformers, cfg[0])(**sizes, **cfg[2])).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    with torch.no_grad():  # transformers' model: 3 class scores per sequence, not vocabulary logits per token
        assert model(input_ids=torch.ones(2, 5, dtype=torch.long)).logits.shape == (2, 3)
    with pytest.raises(SurgeryError, match=r"tensor 'score\.weight' is not part of the \w+ language model"):
        export_checkpoint(src, tmp_path / "o.onnx")
    assert_nothing_written(tmp_path, {"src"})


@pytest.mark.parametrize("with_config", [True, False], ids=["quantization_config", "tensor-names-only"])
def test_a_bitsandbytes_checkpoint_is_refused(tmp_path, with_config):
    """bitsandbytes' 8-bit checkpoints keep int8 codes under the float names ('q_proj.weight') with the
    row scales beside them ('q_proj.SCB'): read as the LLaMA family, the codes were cast to float and the
    scales ignored, and the export "checked" against the same garbage module. Refused naming the format;
    nothing written."""
    import json

    from safetensors.torch import load_file

    from tests.hf_tiny import save_tiny_llama

    src = save_tiny_llama(tmp_path / "src")
    state = load_file(src / "model.safetensors")
    for name in [n for n in state if n.endswith("proj.weight")]:
        scale = state[name].abs().amax(1)  # LLM.int8() row-wise absmax
        state[name] = torch.round(state[name] / scale[:, None] * 127).to(torch.int8)
        state[name[: -len("weight")] + "SCB"] = scale
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    if with_config:
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
        (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SurgeryError, match="bitsandbytes" if with_config else r"proj\.SCB. is a packed weight"):
        export_checkpoint(src, tmp_path / "o.onnx")
    assert_nothing_written(tmp_path, {"src"})
