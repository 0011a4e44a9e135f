"""GGUF for Gemma 2, Gemma 3, Phi-3 and GPT-NeoX, checked against what llama.cpp's converter does to
each family (``convert_hf_to_gguf.py``: Gemma's norm weights plus one, GPT-NeoX's per-head qkv rows
regrouped, Phi-3's fused projections kept fused) with the ``gguf`` package's reader and dequantizer, and,
for the families transformers' GGUF loader reads (gemma2, gemma3, phi3), by loading the file there and
comparing logits with transformers' model holding our dequantized weights. transformers has no GGUF
loader for GPT-NeoX: it is checked with the reader only."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.deploy import deploy
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.grids import QuantScheme
from tests.deploy.conftest import reference_model, rtn_source
from tests.hf_tiny import save_tiny_decoder

Q4_1 = QuantScheme(4, "group", 32, False)
#: transformers' GGUF loader reads neither query_pre_attn_scalar nor the soft-caps (its config class
#: defaults then apply: 256, 50, 30), so the Gemma models use head_dim 256 = query_pre_attn_scalar;
#: Gemma 3: seven layers, llama.cpp's pattern (five sliding, one full), local rope 10000, global 1e6
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
#: Phi-3 128k-style longrope (short/long factors distinct), pretrained context 32 of 256
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
                 "short_factor": [1.0, 1.3, 1.9, 2.5], "long_factor": [1.1, 2.0, 4.0, 7.0]}
PHI3_LONG = {"max_position_embeddings": 256, "original_max_position_embeddings": 32, "rope_parameters": PHI3_LONGROPE}
MODELS = {
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256},
    "gemma3": {"head_dim": 256, "query_pre_attn_scalar": 256, "num_hidden_layers": 7, "sliding_window_pattern": 6,
               "rope_parameters": GEMMA3_ROPE},
    "phi3": {},
    "gpt_neox": {},
}
ARCH = {"gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "gpt_neox": "gptneox"}


def block_weights(name: str) -> bool:
    """Every Linear weight in the blocks."""
    return ".layers." in name and name.endswith(".weight") and "norm" not in name


def off_grid(folder) -> tuple[str, ...]:
    """The block weights whose rows 32 does not divide (kept float, as ``surgery quantize`` must)."""
    ckpt = Checkpoint.open(folder)
    return tuple(n for n in ckpt.keys() if block_weights(n) and ckpt.shape(n)[1] % 32)  # noqa: SIM118


@pytest.fixture(scope="module", params=list(MODELS))
def written(request, tmp_path_factory):
    kind = request.param
    work = tmp_path_factory.mktemp(kind)
    folder = save_tiny_decoder(kind, work / "tiny", **MODELS[kind])
    src = rtn_source("gguf", Q4_1, skip=off_grid(folder), folder=folder, select=block_weights)
    out = work / "out" / "m.gguf"
    out.parent.mkdir()
    report = deploy(src, out, "gguf", gguf_tokenizer="none")
    return kind, src, out, report


def converter_rows(kind: str, name: str, data: np.ndarray, config: dict) -> np.ndarray:
    """GPTNeoXModel.modify_tensors: query_key_value rows [q_h, k_h, v_h] per head -> [q; k; v]."""
    if kind == "gpt_neox" and "query_key_value" in name:
        n_head = config["num_attention_heads"]
        per = data.reshape(n_head, 3, -1, *data.shape[1:])
        return np.concatenate([per[:, i].reshape(-1, *data.shape[1:]) for i in range(3)])
    return data


def test_gguf_dequantizer_returns_our_weights_after_the_converters_changes(written):
    kind, src, out, report = written
    assert report.max_scale_rounding_error == 0.0 and report.details["architecture"] == ARCH[kind]
    config = src.config
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCH[kind])
    tmap = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    quantized = {w.name: w for w in src.weights}
    assert len(quantized) >= 2 * config["num_hidden_layers"]
    for name in src.ckpt.keys():  # noqa: SIM118
        if name.endswith("rotary_emb.inv_freq") or (kind == "gemma2" and name == "lm_head.weight"):
            continue
        t = tensors[tmap.get_name(name, try_suffixes=(".weight", ".bias"))]
        if name in quantized:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
            ours = converter_rows(kind, name, quantized[name].dequantize().numpy(), config)
            np.testing.assert_array_equal(dequantize(t.data, t.tensor_type), ours, err_msg=name)
        else:
            ours = src.ckpt.get(name).float().numpy()
            if kind.startswith("gemma") and name.endswith("norm.weight"):  # Gemma's (1 + w) norms
                ours = ours + np.float32(1)
            ours = converter_rows(kind, name, ours, config)
            np.testing.assert_array_equal(np.asarray(t.data, dtype=np.float32).reshape(ours.shape), ours,
                                          err_msg=name)


def test_metadata_llama_cpp_reads(written):
    kind, src, out, _ = written
    config, arch = src.config, ARCH[kind]
    field = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert field["general.architecture"] == arch
    for key, value in {"block_count": config["num_hidden_layers"], "embedding_length": config["hidden_size"],
                       "context_length": config["max_position_embeddings"],
                       "feed_forward_length": config["intermediate_size"],
                       "attention.head_count": config["num_attention_heads"]}.items():
        assert field[f"{arch}.{key}"] == value, key
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if kind == "gemma2":
        assert field["gemma2.attention.key_length"] == field["gemma2.attention.value_length"] == 256
        assert field["gemma2.attn_logit_softcapping"] == config["attn_logit_softcapping"]
        assert field["gemma2.final_logit_softcapping"] == config["final_logit_softcapping"]
        assert field["gemma2.attention.sliding_window"] == config["sliding_window"]
    elif kind == "gemma3":
        assert field["gemma3.attention.sliding_window"] == config["sliding_window"]
        assert field["gemma3.rope.freq_base"] == GEMMA3_ROPE["full_attention"]["rope_theta"]
        assert "gemma3.attn_logit_softcapping" not in field
    elif kind == "phi3":
        assert field["phi3.rope.dimension_count"] == head_dim
        assert field["phi3.rope.scaling.original_context_length"] == config["original_max_position_embeddings"]
        assert field["phi3.attention.sliding_window"] == 0
    else:
        assert field["gptneox.rope.dimension_count"] == int(config["rope_parameters"]["partial_rotary_factor"]
                                                            * head_dim)
        assert field["gptneox.use_parallel_residual"] is True
        assert field["gptneox.attention.layer_norm_epsilon"] == pytest.approx(config["layer_norm_eps"])
        assert "gptneox.attention.layer_norm_rms_epsilon" not in field


def test_transformers_gguf_loader_matches_our_forward(written, token_ids):
    from transformers import AutoModelForCausalLM

    kind, src, out, _ = written
    if kind == "gpt_neox":
        pytest.skip("transformers has no GGUF loader for gptneox (checked with gguf's reader above)")
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    ids = token_ids % 97  # 24 tokens: longer than the sliding window 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference_model(src)(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,overrides,message", [
    ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "layer_types": ["full_attention"] * 3},
     r"sliding layers \[\]: llama.cpp's gemma2 graph fixes them"),
    ("gemma3", {"head_dim": 16, "query_pre_attn_scalar": 16, "rope_parameters": GEMMA3_ROPE},
     r"sliding layers \[0, 2\]: llama.cpp's gemma3 graph fixes them as every layer but each 6th"),
    ("gemma3", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window_pattern": 6, "rope_parameters": {
        "sliding_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0},
        "full_attention": GEMMA3_ROPE["full_attention"]}},
     r"sliding layers' rope theta 10000.0 \(linear\): llama.cpp fixes them at 10000, unscaled"),
    # transformers reads the attention factor from rope_parameters; the converter derives it from the contexts
    ("phi3", {**PHI3_LONG, "rope_parameters": {**PHI3_LONGROPE, "attention_factor": 1.5}},
     r"rope attention_factor 1.5: transformers scales attention by 1.5, llama.cpp's converter writes 1.26491"),
    ("phi3", {**PHI3_LONG, "rope_parameters": {**PHI3_LONGROPE, "factor": 2.0}},
     r"rope factor 2.0: transformers scales attention by 1.09"),
    ("phi3", {"sliding_window": 16}, "sliding_window 16 < context 64: llama.cpp's phi3 graph attends"),
    ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 32}, "query_pre_attn_scalar 32 != head_dim 16"),
    # llama.cpp refuses to load such a file ("wrong number of tensors"): its graph takes no o_proj bias
    ("qwen3", {"attention_bias": True}, "attention_bias true: llama.cpp's qwen3 graph has no place"),
    ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "attention_bias": True},
     "attention_bias true: llama.cpp's gemma2 graph"),
])
def test_configs_llama_cpp_computes_differently_refused(tmp_path, kind, overrides, message):
    folder = save_tiny_decoder(kind, tmp_path / "tiny", **overrides)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SurgeryError, match=message) as e:
        deploy(rtn_source("gguf", Q4_1, skip=off_grid(folder), folder=folder, select=block_weights),
               out / "m.gguf", "gguf", gguf_tokenizer="none")
    assert "\n" not in str(e.value) and list(out.iterdir()) == []


def _float_gguf(folder, out):
    deploy(rtn_source("gguf", Q4_1, skip=off_grid(folder), folder=folder, select=block_weights), out, "gguf",
           gguf_tokenizer="none")
    reader = gguf.GGUFReader(out)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_gemma3_linear_global_rope_is_written_as_transformers_scales_it(tmp_path):
    """Gemma 3 4B-27B: linear x8 on the full layers only. The file says linear with transformers' factor
    (its full layers' inv_freq over the unscaled one), which llama.cpp's gemma3 graph applies to the full
    layers (get_rope_freq_scale) while the sliding ones keep 1, as transformers' sliding table does."""
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    folder = save_tiny_decoder("gemma3", tmp_path / "tiny", head_dim=16, query_pre_attn_scalar=16,
                               num_hidden_layers=7, sliding_window_pattern=6)
    config = AutoConfig.from_pretrained(folder)
    rotary = Gemma3RotaryEmbedding(config)  # the tables transformers' Gemma 3 rotates by, per layer type
    full, sliding = rotary.full_attention_inv_freq, rotary.sliding_attention_inv_freq
    exponents = torch.arange(0, 16, 2).float() / 16
    field, _ = _float_gguf(folder, tmp_path / "m.gguf")
    assert field["gemma3.rope.scaling.type"] == "linear"
    base = field["gemma3.rope.freq_base"]
    # llama.cpp's full layers: position x freq_scale (1 / factor) x base^(-2i/d)
    torch.testing.assert_close(full, base ** -exponents / field["gemma3.rope.scaling.factor"])
    # its sliding layers: base 10000, freq_scale 1 (rope_freq_base/scale_train_swa for gemma3)
    torch.testing.assert_close(sliding, 10000.0 ** -exponents)
    assert rotary.full_attention_attention_scaling == rotary.sliding_attention_attention_scaling == 1.0


def test_phi3_longrope_is_written_as_transformers_computes_it(tmp_path):
    """Phi-3 128k / 3.5: the long and short factors as transformers' longrope tables divide the default
    frequencies (above / within the pretrained context), its attention factor, and the pretrained context
    llama.cpp chooses between them by."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = save_tiny_decoder("phi3", tmp_path / "tiny", **PHI3_LONG)
    config = AutoConfig.from_pretrained(folder)
    default = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    short, attn = ROPE_INIT_FUNCTIONS["longrope"](config, seq_len=32)
    long, attn_long = ROPE_INIT_FUNCTIONS["longrope"](config, seq_len=33)
    field, tensors = _float_gguf(folder, tmp_path / "m.gguf")
    for name, table in (("rope_factors_short.weight", short), ("rope_factors_long.weight", long)):
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        torch.testing.assert_close(torch.from_numpy(np.asarray(t.data, dtype=np.float32).copy()), default / table)
    assert not torch.equal(short, long)
    assert field["phi3.rope.scaling.attn_factor"] == pytest.approx(attn, rel=1e-6) and attn == attn_long
    assert attn > 1.0
    assert field["phi3.rope.scaling.original_context_length"] == config.original_max_position_embeddings == 32
    assert field["phi3.context_length"] == 256 and "phi3.rope.scaling.type" not in field


def test_gemma2_hidden_act_gelu_alone_is_written(tmp_path):
    """transformers' Gemma 2 MLP reads hidden_activation only (default gelu_pytorch_tanh, llama.cpp's gemma2
    graph): a config.json saying hidden_act 'gelu' without hidden_activation is that model, not refused."""
    import json

    folder = save_tiny_decoder("gemma2", tmp_path / "tiny", **MODELS["gemma2"])
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("hidden_activation", None)
    path.write_text(json.dumps(cfg | {"hidden_act": "gelu"}))
    out = tmp_path / "m.gguf"
    deploy(rtn_source("gguf", Q4_1, skip=off_grid(folder), folder=folder, select=block_weights), out, "gguf",
           gguf_tokenizer="none")
    assert out.stat().st_size > 0


@pytest.mark.parametrize("name", ["gemma-3-4b", "phi-3.5-mini"])
def test_published_rope_spellings_are_written(tmp_path, name):
    """config.json as the Hub's Gemma 3 4B and Phi-3.5-mini spell it (4.x ``rope_scaling`` beside
    ``rope_theta`` / ``rope_local_base_freq``; Phi-3.5's ``type: longrope``): the same keys as above, with
    the values the file's own config states."""
    import json
    import math

    from tests.families.test_decoder import PUBLISHED, save_published

    kind, config = PUBLISHED[name]
    folder = save_published(kind, config, tmp_path / "m")
    stated = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in stated and stated["rope_scaling"] == config["rope_scaling"]
    field, tensors = _float_gguf(folder, tmp_path / "m.gguf")
    if kind == "gemma3":
        assert field["gemma3.rope.scaling.type"] == "linear" and field["gemma3.rope.scaling.factor"] == 8.0
        assert field["gemma3.rope.freq_base"] == config["rope_theta"]
    else:
        original = config["original_max_position_embeddings"]
        scale = config["max_position_embeddings"] / original
        assert field["phi3.rope.scaling.attn_factor"] == pytest.approx(
            math.sqrt(1 + math.log(scale) / math.log(original)), rel=1e-6)
        for which in ("long", "short"):
            np.testing.assert_array_equal(tensors[f"rope_factors_{which}.weight"].data,
                                          np.float32(config["rope_scaling"][f"{which}_factor"]))
