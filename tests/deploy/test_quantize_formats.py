"""`surgery quantize --format gptq|compressed-tensors|gguf`: schemes, weights and tokenizers a format
cannot hold are refused in one line before calibration; the scales the quantizer exports are exactly
what the format stores."""

from __future__ import annotations

import json
import re

import gguf
import pytest
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from modelsurgery.deploy import convert_packed
from tests.deploy.conftest import LLAMA

runner = CliRunner()
CALIB = LLAMA.parents[1] / "data" / "charlm_calib.txt"
MISSING = "no-such-calibration-file.txt"  # the refusals below come before the data is read


def quantize(*args):
    return runner.invoke(app, ["quantize", str(LLAMA), *args])


@pytest.mark.parametrize("fmt,args,message", [
    ("gguf", ["--bits", "4"], "--format gguf stores Q8_0 .* got 4-bit symmetric channel"),
    ("gguf", ["--bits", "4", "--granularity", "group", "--group-size", "32", "--skip", "down_proj"],
     "WordLevel tokenizer.json .* --gguf-tokenizer none"),
    ("gptq", ["--bits", "3", "--granularity", "group", "--group-size", "16"],
     "mlp.gate_proj.weight' \\[176, 64\\]: GPTQ packs 3-bit codes into int32 words"),
    ("gptq", ["--bits", "5"], "--format gptq stores 2, 3, 4 or 8-bit weights"),
    # optimum replaces only the blocks' Linears: a quantized head would load uninitialised in transformers
    ("gptq", ["--no-default-skips", "--skip", "embed_tokens"],
     "tensor 'lm_head.weight': --format gptq quantizes Linear layers inside the blocks"),
    ("compressed-tensors", ["--granularity", "tensor"], "--format compressed-tensors .* channel or group"),
    ("compressed-tensors", ["--no-default-skips"], "not embedding tables"),
])
def test_refused_in_one_line_before_calibration(tmp_path, fmt, args, message):
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    res = quantize("-o", str(out), "--format", fmt, "--method", "flexround", "--calib", MISSING, *args)
    assert res.exit_code == 1
    line = res.output.strip()
    assert "\n" not in line and re.search(message, line), line
    assert list(tmp_path.iterdir()) == []


def test_learned_scales_stored_exactly(tmp_path):
    """FlexRound learns its scales: quantizing for GGUF Q4_1 rounds them to what Q4_1 stores (fp16 d,
    with few enough significant bits that m = -z * d is an fp16 value too), so the writer finds
    nothing left to round."""
    res = quantize("-o", str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-tokenizer", "none",
                   "--method", "flexround", "--bits", "4", "--asymmetric", "--granularity", "group", "--group-size",
                   "32", "--skip", "down_proj", "--skip", "mlp", "--calib", str(CALIB), "--samples", "4", "--seq-len",
                   "16", "--steps", "2", "--batch-size", "4", "--fast", "--json", "-q")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["deploy"]["details"]["type"] == "Q4_1"
    assert result["deploy"]["max_scale_rounding_error"] == 0.0
    stored = [t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.tensor_type.name == "Q4_1"]
    assert len(stored) == len(result["layers"]) == 16


def test_packed_conversion_rounds_scales_and_force_replaces(tmp_path):
    """A packed run keeps float32 scales: converting it rounds them to fp16, and the report says by how
    much; --force replaces an existing GGUF file."""
    rtn = ["--method", "rtn", "--bits", "4", "--granularity", "group", "--group-size", "32", "--skip", "down_proj",
           "-q"]
    assert quantize("-o", str(tmp_path / "packed"), "--format", "packed", *rtn).exit_code == 0
    report = convert_packed(tmp_path / "packed", tmp_path / "converted.gguf", "gguf", gguf_tokenizer="none")
    assert 0 < report.max_scale_rounding_error < 1e-3
    for _ in range(2):
        res = quantize("-o", str(tmp_path / "converted.gguf"), "--format", "gguf", "--gguf-tokenizer", "none",
                       "--force", *rtn)
        assert res.exit_code == 0, res.output
    res = quantize("-o", str(tmp_path / "converted.gguf"), "--format", "gguf", "--gguf-tokenizer", "none", *rtn)
    assert res.exit_code == 1 and "--force" in res.output


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_rtn_folder_formats_written_exactly(tmp_path, fmt):
    res = quantize("-o", str(tmp_path / "m"), "--format", fmt, "--method", "rtn", "--bits", "4", "--asymmetric",
                   "--granularity", "group", "--group-size", "16", "--json", "-q")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["deploy"]["max_scale_rounding_error"] == 0.0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("gptq" if fmt == "gptq" else "compressed-tensors")
    assert (tmp_path / "m" / "tokenizer.json").is_file()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compressed_tensors_scales_in_a_half_precision_models_dtype(tmp_path, dtype):
    """compressed-tensors keeps scales in the model's dtype (as llm-compressor writes them, and as vLLM and
    transformers load them): for a bf16/fp16 model the scales are stored in that dtype, the quantizer learns
    on scales that dtype holds (nothing moves when they are stored), and the package's own decompressor
    gives the weights of the quantizer's grid."""
    import torch
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from modelsurgery.checkpoint import Checkpoint
    from modelsurgery.deploy import read_deployed
    from tests.hf_tiny import save_tiny_qwen2

    AutoModelForCausalLM.from_pretrained(save_tiny_qwen2(tmp_path / "f32"), dtype=getattr(torch, dtype)) \
        .save_pretrained(tmp_path / "half")
    res = runner.invoke(app, ["quantize", str(tmp_path / "half"), "-o", str(tmp_path / "ct"), "--format",
                              "compressed-tensors", "--json", "--method", "rtn", "--bits", "4", "--asymmetric",
                              "--granularity", "group", "--group-size", "8", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["deploy"]["max_scale_rounding_error"] == 0.0
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    (group,) = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"] \
        .values()
    scheme = QuantizationScheme.model_validate(group)
    ours = {w.name: w.dequantize() for w in read_deployed(Checkpoint.open(tmp_path / "ct"))}
    assert len(ours) == 21
    for name, weight in ours.items():
        module = name[: -len(".weight")]
        local = {k[len(module) + 1:]: v for k, v in stored.items() if k.startswith(module + ".")}
        assert local["weight_scale"].dtype == getattr(torch, dtype)
        theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(theirs, weight.to(theirs.dtype)), module


def test_gguf_named_after_the_model_quantized(tmp_path, monkeypatch):
    """general.name is the name llama.cpp's converter gives the input (gguf-py's Metadata: the folder's
    name in title form; a hub id as its --remote mode writes it), never 'packed', the folder the quantize
    path packs into; converting a packed folder names the file after that folder, by the same rule."""
    import hashlib
    import os
    import shutil

    def name(path):
        return gguf.GGUFReader(path).fields["general.name"].contents()

    model = shutil.copytree(LLAMA, tmp_path / "char-llama")
    rtn = ["--method", "rtn", "--bits", "8", "--granularity", "group", "--group-size", "32", "--skip", "down_proj",
           "-q"]
    res = runner.invoke(app, ["quantize", str(model), "-o", str(tmp_path / "q.gguf"), "--format", "gguf",
                              "--gguf-tokenizer", "none", *rtn])
    assert res.exit_code == 0, res.output
    assert name(tmp_path / "q.gguf") == "Char Llama"
    res = runner.invoke(app, ["quantize", str(model), "-o", str(tmp_path / "char-llama-q8"), "--format", "packed",
                              *rtn])
    assert res.exit_code == 0, res.output
    convert_packed(tmp_path / "char-llama-q8", tmp_path / "p.gguf", "gguf", gguf_tokenizer="none")
    assert name(tmp_path / "p.gguf") == "Char Llama Q8"
    # a hub id read from the local cache (huggingface_hub's layout: snapshot files link into blobs/)
    storage = tmp_path / "hub" / "models--tiny-org--char-llama"
    snapshot = storage / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text("c" * 40)
    for f in LLAMA.iterdir():
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    res = runner.invoke(app, ["quantize", "tiny-org/char-llama", "-o", str(tmp_path / "h.gguf"), "--format", "gguf",
                              "--gguf-tokenizer", "none", *rtn])
    assert res.exit_code == 0, res.output
    assert name(tmp_path / "h.gguf") == "tiny-org/char-llama"
