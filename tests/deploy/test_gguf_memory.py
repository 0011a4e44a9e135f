"""The GGUF writer holds one tensor's output at a time: a float tensor is converted a slice of rows at a
time into its output array (read from the file a slice at a time), a quantized one encoded a slice of
rows at a time into its blocks. The files are llama.cpp's converter's bit for bit (its row permutation
of the source, -0.0 kept), whatever the slices."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors.torch import save_file

import modelsurgery.deploy.gguf as gguf_writer
from modelsurgery.checkpoint import Checkpoint
from modelsurgery.deploy import convert_packed, deploy
from modelsurgery.ops.quantize.grids import QuantScheme
from modelsurgery.ops.quantize.operation import QuantizeOptions, quantize_checkpoint
from tests.deploy.conftest import rtn_source
from tests.deploy.test_gguf import converter_permute
from tests.hf_tiny import save_tiny_llama

Q8_0 = QuantScheme(8, "group", 32, True)
ROLE = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output", "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down", "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "ffn_norm"}


def gguf_name(name: str) -> str:
    if not name.startswith("model.layers."):
        return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}[name]
    layer, rest = name.split(".")[2], name.split(".", 3)[3]
    return f"blk.{layer}.{ROLE[rest]}.weight"


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    """A tiny LLaMA in bfloat16 with -0.0 in its embedding, q_proj and a norm."""
    folder = save_tiny_llama(tmp_path_factory.mktemp("bf16") / "llama", intermediate_size=64)
    ckpt = Checkpoint.open(folder)
    tensors = {k: ckpt.get(k).to(torch.bfloat16).contiguous() for k in ckpt.keys()}  # noqa: SIM118
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.input_layernorm.weight"):
        tensors[name].view(-1)[::7] = -0.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    return folder


@pytest.mark.parametrize("chunk", [gguf_writer.CHUNK, 40, 100])
def test_tensors_are_the_converters_bit_for_bit_in_any_slices(bf16_llama, tmp_path, monkeypatch, chunk):
    """Slices of one row (40), of three rows across head boundaries (100) or whole tensors: every float
    tensor is the source in float32 with the converter's q/k row permutation (``LlamaModel.permute``),
    compared bit for bit (the writer used to add 0.0, turning -0.0 into +0.0); every quantized one
    dequantizes to our weight, permuted the same way."""
    monkeypatch.setattr(gguf_writer, "CHUNK", chunk)
    src = rtn_source("gguf", Q8_0, skip=("q_proj", "gate_proj"), folder=bf16_llama)
    out = tmp_path / "m.gguf"
    deploy(src, out, "gguf", gguf_tokenizer="none")
    config = src.config
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    quantized = {w.name: w for w in src.weights}
    assert "model.layers.0.self_attn.k_proj.weight" in quantized
    for name in src.ckpt.keys():  # noqa: SIM118
        t = tensors[gguf_name(name)]
        role = gguf_name(name).split(".")[-2]
        if name in quantized:
            ours = quantized[name].dequantize().numpy()
            theirs = dequantize(t.data, t.tensor_type)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            ours = src.ckpt.get(name).float().numpy()
            theirs = np.asarray(t.data).reshape(ours.shape)
        if role in heads:
            ours = converter_permute(ours, heads[role])
        np.testing.assert_array_equal(theirs.view(np.uint32), ours.view(np.uint32), err_msg=name)
    embedding = np.asarray(tensors["token_embd.weight"].data)
    assert (np.signbit(embedding) & (embedding == 0)).any()


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory) -> tuple[Path, Path]:
    """A bf16 LLaMA whose embedding and head (32768 x 256: 32 MiB each in float32) are most of it, quantized
    RTN 8-bit in groups of 32 to packed checkpoints: with the default skips (embedding and head kept float)
    and without (every weight quantized)."""
    work = tmp_path_factory.mktemp("wide")
    folder = work / "model"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
              "vocab_size": 32768, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (32768, 256), "model.layers.0.input_layernorm.weight": (256,),
              "model.layers.0.post_attention_layernorm.weight": (256,), "model.norm.weight": (256,),
              "lm_head.weight": (32768, 256)}
    shapes.update({f"model.layers.0.self_attn.{p}.weight": (256, 256) for p in ("q_proj", "k_proj", "v_proj",
                                                                                 "o_proj")})
    shapes.update({"model.layers.0.mlp.gate_proj.weight": (512, 256), "model.layers.0.mlp.up_proj.weight": (512, 256),
                   "model.layers.0.mlp.down_proj.weight": (256, 512)})
    save_file({n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    packed = {}
    for skips in (True, False):
        packed[skips] = work / f"packed-{skips}"
        quantize_checkpoint(folder, packed[skips], QuantizeOptions(
            bits=8, method="rtn", granularity="group", group_size=32, format="packed", default_skips=skips,
            storage="gguf", hash_inputs=False))
    return packed[True], packed[False]


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident memory read from /proc/self")
def test_float_embedding_written_holding_one_float32_copy(wide_vocab, tmp_path):
    """The bf16 embedding and head written as F32 raise the process's peak resident memory (the kernel's own
    high-water mark, reset before the conversion; torch's conversions are not seen by tracemalloc) by less
    than 1.5 of their float32 size: the output array and a slice. The writer used to hold the bf16 read,
    its float32 copy and that copy plus 0.0 at once: 2.5 of it."""
    packed = wide_vocab[0]
    convert_packed(packed, tmp_path / "warm.gguf", "gguf", gguf_tokenizer="none")  # imports, first-call caches
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pytest.skip("/proc/self/clear_refs not writable")
    start = _status_kb("VmHWM")
    convert_packed(packed, tmp_path / "m.gguf", "gguf", gguf_tokenizer="none")
    peak = (_status_kb("VmHWM") - start) * 1024
    largest = 32768 * 256 * 4
    assert peak < 1.5 * largest, (peak / largest)
    t = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "token_embd.weight")
    source = Checkpoint.open(packed).get("model.embed_tokens.weight").float().numpy()
    np.testing.assert_array_equal(np.asarray(t.data).reshape(source.shape), source)


def test_quantized_embedding_written_holding_its_blocks_and_a_slice(wide_vocab, tmp_path):
    """An 8-bit embedding (--no-default-skips) adds less than 2.5 of its Q8_0 blocks (8.5 MiB) to numpy's traced
    peak: the blocks, its scales and zero points (0.14 of them) and one slice's bit streams and temporaries
    (the writer used to unpack every code, copy them and encode the whole tensor at once: 7 times the blocks)."""
    packed = wide_vocab[1]
    convert_packed(packed, tmp_path / "warm.gguf", "gguf", gguf_tokenizer="none")
    tracemalloc.start()
    try:
        convert_packed(packed, tmp_path / "m.gguf", "gguf", gguf_tokenizer="none")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    blocks = 32768 * 256 // 32 * 34
    assert peak < 2.5 * blocks, peak / blocks
    t = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "token_embd.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    from modelsurgery.deploy.common import open_packed

    ours = next(w for w in open_packed(packed).weights if w.name == "model.embed_tokens.weight").dequantize()
    np.testing.assert_array_equal(dequantize(t.data, t.tensor_type), ours.numpy())
