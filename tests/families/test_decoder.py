"""The decoder LLM families against transformers' own models (eager attention, float32): tiny random
configs of every family, and each family's published config.json shapes scaled down (written as the
published files spell them, so the 4.x keys are read too); right-padded batches longer than the window."""

from __future__ import annotations

import json

import pytest
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.families.transformer import attention_bias
from tests.families import onnx_max_diff
from tests.hf_tiny import DECODER_FAMILY, load_hf, save_tiny_decoder

TOL = 1e-4


def padded_batch(vocab: int = 97, seq: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, seq), generator=g)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # right padding
    mask[2, seq // 3:] = 0
    return ids, mask


def max_diff(module, ref, ids, mask) -> float:
    with torch.no_grad():
        ours = module(input_ids=ids, attention_mask=mask)
        expected = ref(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == expected.shape
    return (ours - expected).abs().max().item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> folder of a tiny random checkpoint written by transformers (built once per module)."""
    return {kind: save_tiny_decoder(kind, tmp_path_factory.mktemp(kind)) for kind in DECODER_FAMILY}


@pytest.mark.parametrize("kind", list(DECODER_FAMILY))
def test_detected_and_matches_transformers(tiny, kind):
    """Sequence 12 is longer than the sliding window (5) of Mistral and Gemma; rows 0 and 2 are padded."""
    fam = detect_family(Checkpoint.open(tiny[kind]))
    assert fam.name == DECODER_FAMILY[kind] and fam.num_layers == 3
    module = fam.build_module()
    assert sorted(module.state_dict()) == sorted(fam.ckpt.keys())
    ref = load_hf(tiny[kind])
    assert max_diff(module, ref, *padded_batch()) < TOL
    assert max_diff(module, ref, padded_batch()[0], None) < TOL


@pytest.mark.parametrize("kind", list(DECODER_FAMILY))
def test_stages_compose_to_forward(tiny, kind):
    fam = detect_family(Checkpoint.open(tiny[kind]))
    module = fam.build_module()
    inputs = fam.example_inputs(batch=2, seq_len=9, generator=torch.Generator().manual_seed(1))
    st = module.stages()
    with torch.no_grad():
        hidden, ctx = st.embed(**inputs)
        for block in st.blocks:
            hidden = block(hidden, **ctx)
        assert torch.equal(st.head(hidden), module(**inputs))


@pytest.mark.parametrize("kind", list(DECODER_FAMILY))
def test_bfloat16_forward_is_as_close_to_float32_as_transformers_own(tiny, kind):
    """Run in bfloat16 (norms and softmax upcast where transformers upcasts), both ours and transformers'
    stay as close to the float32 logits: ours within 1.5x transformers' own bf16 error (+1e-3)."""
    fam = detect_family(Checkpoint.open(tiny[kind]))
    ref = load_hf(tiny[kind])
    ids, mask = padded_batch()
    with torch.no_grad():
        exact = ref(input_ids=ids, attention_mask=mask).logits
        theirs = ref.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits.float()
        ours = fam.build_module(dtype=torch.bfloat16)(input_ids=ids, attention_mask=mask)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - exact).abs().max() <= 1.5 * (theirs - exact).abs().max() + 1e-3


# Published config.json files (as shipped on the hub), with sizes scaled down and the ratios kept:
# GQA ratio, head_dim vs hidden/heads, biases, norms, window rule, rope kind. The keys are spelled as
# in the published files (transformers 4.x names: rope_scaling, rope_theta, rotary_pct, ...).
PUBLISHED = {
    # meta-llama/Llama-3.2-1B: 32 heads / 8 kv, head_dim 64, tied, llama3 rope x32 (orig 8192), eps 1e-5
    "llama-3.2-1b": ("llama3", {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                                "head_dim": 8, "intermediate_size": 256, "rms_norm_eps": 1e-5,
                                "tie_word_embeddings": True, "rope_theta": 500000.0,
                                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    # meta-llama/Llama-3.1-8B: untied head, llama3 rope x8
    "llama-3.1-8b": ("llama3", {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                                "intermediate_size": 224, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                                "rope_theta": 500000.0,
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    # mistralai/Mistral-7B-v0.1: 32/8 heads, sliding_window 4096 (here 4 < sequence), theta 1e4
    "mistral-7b-v0.1": ("mistral", {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                                    "intermediate_size": 224, "rms_norm_eps": 1e-5, "sliding_window": 4,
                                    "rope_theta": 10000.0}),
    # mistralai/Mistral-7B-v0.3: no sliding window, theta 1e6
    "mistral-7b-v0.3": ("mistral", {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                                    "intermediate_size": 224, "sliding_window": None, "rope_theta": 1000000.0}),
    # Qwen/Qwen2.5-0.5B: 14 heads / 2 kv, head_dim 64, q/k/v biases, tied, use_sliding_window false
    "qwen2.5-0.5b": ("qwen2", {"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 1,
                               "intermediate_size": 152, "tie_word_embeddings": True, "rope_theta": 1000000.0,
                               "use_sliding_window": False, "sliding_window": 4, "max_window_layers": 2}),
    # Qwen/Qwen3-0.6B: 16 heads / 8 kv, head_dim 128 with hidden 1024 (head_dim*heads = 2 x hidden)
    "qwen3-0.6b": ("qwen3", {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                             "intermediate_size": 96, "tie_word_embeddings": True, "rope_theta": 1000000.0}),
    # google/gemma-2b: 8 heads / 1 kv, head_dim 256 = hidden/heads, hidden_act 'gelu' (run as the tanh GELU)
    "gemma-2b": ("gemma", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                           "intermediate_size": 512, "hidden_act": "gelu", "rope_theta": 10000.0,
                           "rope_scaling": None, "initializer_range": 0.2}),
    # google/gemma-2-9b: 16/8 heads, head_dim 256, query_pre_attn_scalar 224 (!= head_dim), caps 50/30
    "gemma-2-9b": ("gemma2", {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                              "query_pre_attn_scalar": 12, "intermediate_size": 192, "sliding_window": 4,
                              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                              "rope_theta": 10000.0}),
    # google/gemma-3-1b-pt: 4 heads / 1 kv, head_dim 256, window 512 on 5 of 6 layers, local theta 1e4
    "gemma-3-1b": ("gemma3", {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 1,
                              "head_dim": 16, "query_pre_attn_scalar": 16, "intermediate_size": 96,
                              "num_hidden_layers": 7, "sliding_window": 4, "sliding_window_pattern": 6,
                              "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None}),
    # google/gemma-3-4b (text): global rope linear x8
    "gemma-3-4b": ("gemma3", {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "head_dim": 16, "query_pre_attn_scalar": 16, "intermediate_size": 96,
                              "sliding_window": 4, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
                              "rope_local_base_freq": 10000.0,
                              "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    # microsoft/Phi-3-mini-4k-instruct: 32/32 heads, sliding_window 2047, fused qkv and gate_up
    "phi-3-mini-4k": ("phi3", {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 8,
                               "intermediate_size": 160, "sliding_window": 6, "rope_theta": 10000.0}),
    # microsoft/Phi-3.5-mini-instruct: longrope (long/short factors per frequency), original 4096
    "phi-3.5-mini": ("phi3", {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 8,
                              "intermediate_size": 160, "max_position_embeddings": 64,
                              "original_max_position_embeddings": 8, "rope_theta": 10000.0,
                              "rope_scaling": {"type": "longrope",
                                               "long_factor": [1.0, 1.3, 2.1, 4.5],
                                               "short_factor": [1.0, 1.02, 1.1, 1.05]}}),
    # EleutherAI/pythia-70m: parallel residual, rotary_pct 0.25, untied embed_out, LayerNorm eps 1e-5
    "pythia-70m": ("gpt_neox", {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
                                "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True}),
}


def save_published(kind: str, config: dict, folder) -> object:
    """Build with transformers, then rewrite config.json as the published file spells it."""
    legacy = {k: v for k, v in config.items() if k in ("rope_scaling", "rope_theta", "rope_local_base_freq",
                                                        "rotary_pct", "rotary_emb_base", "sliding_window_pattern",
                                                        "hidden_act")}
    build = {k: v for k, v in config.items() if k not in legacy or k in ("sliding_window_pattern",)}
    rope = dict(config.get("rope_scaling") or {})
    if kind == "phi3" and rope:
        build["rope_parameters"] = {**rope, "rope_type": rope["type"], "rope_theta": config["rope_theta"]}
        build["rope_parameters"].pop("type")
    elif kind == "gemma3":
        build["rope_parameters"] = {
            "sliding_attention": {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]},
            "full_attention": {"rope_type": "default", "rope_theta": config["rope_theta"]} | rope}
    elif kind == "gpt_neox":
        build["rope_parameters"] = {"rope_type": "default", "rope_theta": float(config["rotary_emb_base"]),
                                    "partial_rotary_factor": config["rotary_pct"]}
    else:
        build["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]} | rope
    save_tiny_decoder(kind, folder, seed=3, **build)
    path = folder / "config.json"
    written = json.loads(path.read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        written.pop(key, None)
    path.write_text(json.dumps(written | legacy))
    return folder


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_shapes_match_transformers(tmp_path, name):
    kind, config = PUBLISHED[name]
    folder = save_published(kind, config, tmp_path)
    fam = detect_family(Checkpoint.open(folder))
    assert fam.name == DECODER_FAMILY[kind]
    ref = load_hf(folder)
    module = fam.build_module()
    for seq in (6, 14):  # within and beyond windows, longrope's original length, llama3's original context
        assert max_diff(module, ref, *padded_batch(seq=seq, seed=seq)) < TOL, seq


@pytest.mark.parametrize(("kind", "overrides"), [
    # Mistral-NeMo: head_dim 128 with hidden 5120 / 32 heads (head_dim * heads != hidden)
    ("mistral", {"hidden_size": 40, "head_dim": 16, "sliding_window": None}),
    # Qwen2 with use_sliding_window: layers from max_window_layers on are windowed
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    # Phi-4-mini: partial_rotary_factor 0.75, tied head
    ("phi3", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}}),
    # GPT-NeoX with a sequential residual
    ("gpt_neox", {"use_parallel_residual": False, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    # Qwen3 with yarn rope scaling (as its long-context configs suggest)
    ("qwen3", {"max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 1000000.0}}),
    # Gemma 2 without soft-capping and with an explicit layer_types list
    ("gemma2", {"attn_logit_softcapping": None, "final_logit_softcapping": None,
                "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
])
def test_config_variants_match_transformers(tmp_path, kind, overrides):
    folder = save_tiny_decoder(kind, tmp_path, seed=6, **overrides)
    fam = detect_family(Checkpoint.open(folder))
    assert fam.name == DECODER_FAMILY[kind]
    assert max_diff(fam.build_module(), load_hf(folder), *padded_batch(seq=13, seed=2)) < TOL


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_gemma_mlp_activation_is_hidden_activation_not_hidden_act(tmp_path, kind):
    """transformers' Gemma 2/3 MLP reads only hidden_activation (default gelu_pytorch_tanh): a config.json
    spelling the activation as Gemma 1's published files do (hidden_act 'gelu', no hidden_activation) still
    runs the tanh GELU. Larger weights (initializer_range 0.2) make the two GELUs differ by ~1e-3."""
    folder = save_tiny_decoder(kind, tmp_path, seed=2, initializer_range=0.2)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("hidden_activation", None)
    path.write_text(json.dumps(cfg | {"hidden_act": "gelu"}))
    fam = detect_family(Checkpoint.open(folder))
    assert max_diff(fam.build_module(), load_hf(folder), *padded_batch()) < TOL


@pytest.mark.parametrize(("kind", "dropped"), [
    ("gemma2", ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window")),
    ("gpt_neox", ("rope_parameters", "layer_norm_eps")),  # rotary_pct 0.25, theta 10000
])
def test_keys_left_out_of_config_take_the_config_class_defaults(tmp_path, kind, dropped):
    """A config.json without a key means transformers' config-class default (Gemma 2: soft-caps 50/30,
    query_pre_attn_scalar 256, window 4096; NeoX: rotary_pct 0.25), not 'off'."""
    folder = save_tiny_decoder(kind, tmp_path, seed=8)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in cfg.items() if k not in dropped}))
    fam = detect_family(Checkpoint.open(folder))
    assert max_diff(fam.build_module(), load_hf(folder), *padded_batch(seq=12, seed=3)) < TOL


def test_published_features_are_reported(tmp_path):
    kind, config = PUBLISHED["gemma-3-1b"]
    feats = detect_family(Checkpoint.open(save_published(kind, config, tmp_path / "g"))).features()
    assert "sliding_window=4 on 6 of 7 layers" in feats and "qk_norm" in feats and "tied head" in feats
    assert "sliding layers: rope theta=10000" in feats and "rope theta=1e+06" in feats
    kind, config = PUBLISHED["llama-3.2-1b"]
    feats = detect_family(Checkpoint.open(save_published(kind, config, tmp_path / "l"))).features()
    assert "rope llama3 x32 theta=500000" in feats and "tied head" in feats
    kind, config = PUBLISHED["gemma-2-9b"]
    feats = detect_family(Checkpoint.open(save_published(kind, config, tmp_path / "g2"))).features()
    assert {"sliding_window=4 on alternate layers", "attention softcap 50", "logit softcap 30",
            "query_pre_attn_scalar=12", "norm scale (1 + w)"} <= set(feats)


def test_sliding_window_band_follows_transformers_definition():
    """transformers' sliding_window_overlay: key j is visible to query i when j > i - window (and j <= i)."""
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    bias = attention_bias(ids, mask, causal=True, dtype=torch.float32, window=3)
    for b in range(2):
        for i in range(9):
            for j in range(9):
                visible = j <= i and j > i - 3 and bool(mask[b, j])
                assert (bias[b, 0, i, j] == 0) == visible


@pytest.mark.parametrize(("kind", "overrides"), [
    ("mistral", {}),  # sliding window band
    ("gemma2", {}),  # soft-capping, alternate windows, (1 + w) norms, embedding scale
    ("gemma3", {}),  # local/global rope, qk-norm
    ("gpt_neox", {}),  # partial rotary, per-head fused qkv, parallel residual
    ("phi3", {"max_position_embeddings": 64, "original_max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0, 1.5, 3.0, 6.0],
        "short_factor": [1.0, 1.1, 1.2, 1.3]}}),  # longrope's switch at the original length
    ("llama3", {"max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),  # NTK base grows past 8 tokens
])
def test_onnx_export_keeps_switches_in_the_graph(tmp_path, kind, overrides):
    """Traced at 4 tokens (inside the window and longrope's original length), run in ONNX Runtime at 14."""
    folder = save_tiny_decoder(kind, tmp_path / "m", seed=5, **overrides)
    fam = detect_family(Checkpoint.open(folder))
    trace = fam.example_inputs(batch=2, seq_len=4, generator=torch.Generator().manual_seed(0))
    ids, mask = padded_batch(seq=14)
    module = fam.build_module()
    assert max_diff(module, load_hf(folder), ids, mask) < TOL
    assert onnx_max_diff(module, fam.input_names(), trace, {"input_ids": ids, "attention_mask": mask},
                         tmp_path) < TOL


def test_rope_frequencies_match_transformers():
    """Each rope kind's inverse frequencies and cos/sin scale against transformers' ROPE_INIT_FUNCTIONS."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from modelsurgery.families.rope import parse_rope

    cases = [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
         "mscale_all_dim": 0.5},
        {"rope_type": "longrope", "long_factor": [1.0 + i for i in range(16)],
         "short_factor": [1.0 + 0.1 * i for i in range(16)], "original_max_position_embeddings": 32},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ]
    for params in cases:
        cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=128,
                          rope_parameters={"rope_theta": 10000.0, **params})
        ours = parse_rope(cfg.to_dict(), 32, "m")
        for seq in (16, 100, 300):
            ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq)
            inv, scale = ours.frequencies(torch.tensor([float(seq)]))
            assert torch.allclose(inv, ref_inv.float(), rtol=1e-6, atol=0), (params, seq)
            assert abs(float(scale) - ref_scale) < 1e-9


# ----- detection and refusals -------------------------------------------------------------------
def test_mistral_with_llama_names_is_mistral_and_lookalike_is_refused(tiny):
    ckpt = Checkpoint.open(tiny["mistral"])
    assert detect_family(ckpt).name == "mistral"
    olmo = Checkpoint.from_state_dict(ckpt.state_dict(), path="olmo.safetensors",
                                      config={**ckpt.config, "model_type": "olmo2",
                                              "architectures": ["Olmo2ForCausalLM"]})
    fam = detect_family(olmo)
    assert fam.name == "unknown" and fam.describe()["closest_family"] == "llama"
    with pytest.raises(SurgeryError, match=r"^olmo.safetensors: config.json model_type 'olmo2' is not a "
                                           r"supported family; .*closest family: llama"):
        fam.build_module()


@pytest.mark.parametrize(("kind", "closest"), [("gemma3", "gemma3"), ("gemma2", "gemma2"), ("qwen3", "qwen3"),
                                               ("phi3", "phi3"), ("gpt_neox", "gpt_neox")])
def test_unknown_model_type_names_the_closest_layout(tiny, kind, closest):
    ckpt = Checkpoint.open(tiny[kind])
    other = Checkpoint.from_state_dict(ckpt.state_dict(), config={**ckpt.config, "model_type": "newthing"})
    assert detect_family(other).name == "unknown"
    assert detect_family(other).describe()["closest_family"] == closest


@pytest.mark.parametrize(("kind", "expected"), [("llama3", "llama"), ("mistral", "llama"), ("qwen3", "qwen3"),
                                                ("gemma2", "gemma2"), ("gemma3", "gemma3"), ("phi3", "phi3"),
                                                ("gpt_neox", "gpt_neox")])
def test_without_config_the_tensor_layout_names_the_family(tiny, kind, expected):
    state = Checkpoint.open(tiny[kind]).state_dict()
    assert detect_family(Checkpoint.from_state_dict(state, path="w.safetensors")).name == expected


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     "config.json layer_types entry 'chunked_attention' is not supported"),
    ("gemma3", {"use_bidirectional_attention": True}, "config.json use_bidirectional_attention=True is not supported"),
    ("phi3", {"rope_parameters": {"rope_type": "mrope", "rope_theta": 10000.0}},
     "config.json rope_parameters.rope_type='mrope' is not supported"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "proportional", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "config.json rope_parameters.full_attention.rope_type='proportional' is not supported"),
])
def test_recognised_family_with_unimplemented_config_is_refused(tiny, kind, change, message):
    ckpt = Checkpoint.open(tiny[kind])
    fam = detect_family(Checkpoint.from_state_dict(ckpt.state_dict(), path="m.safetensors",
                                                   config={**ckpt.config, **change}))
    assert fam.name == DECODER_FAMILY[kind]
    with pytest.raises(SurgeryError, match=f"^m.safetensors: {message}"):
        fam.build_module()
    assert any(f.startswith("not runnable: m.safetensors: " + message.split(" is ")[0]) for f in fam.features())


# ----- roles ------------------------------------------------------------------------------------
def test_roles_describe_fused_and_per_head_tensors(tiny):
    ck = Checkpoint.open(tiny["phi3"])
    phi = detect_family(ck).block_linears(1)
    assert set(phi) == {"qkv", "o", "gate_up", "down"}
    assert phi["qkv"].fused == ("q", "k", "v") and not phi["qkv"].per_head
    assert phi["gate_up"].fused == ("gate", "up") and ck.shape(phi["gate_up"].weight) == (112, 32)
    neox = detect_family(Checkpoint.open(tiny["gpt_neox"]))
    lin = neox.block_linears(0)
    assert lin["qkv"].per_head and lin["qkv"].weight == "gpt_neox.layers.0.attention.query_key_value.weight"
    assert lin["qkv"].bias == "gpt_neox.layers.0.attention.query_key_value.bias"
    assert [n.kind for n in neox.block_norms(0).values()] == ["layernorm", "layernorm"]
    assert neox.head_names() == ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
                                 "embed_out.weight"]
    gemma = detect_family(Checkpoint.open(tiny["gemma3"]))
    norms = gemma.block_norms(2)
    assert set(norms) == {"attn", "attn_post", "mlp", "mlp_post", "q_norm", "k_norm"}
    assert all(n.offset == 1.0 and n.kind == "rmsnorm" for n in norms.values())
    assert [r for r, n in norms.items() if n.per_head] == ["q_norm", "k_norm"]
    assert gemma.ckpt.shape(norms["q_norm"].weight) == (16,)
    assert gemma.attention.head_dim == 16 and gemma.hidden_size == 32
    assert gemma.layer_windows() == [5, None, 5]


def test_zeroed_output_projections_make_gemma_and_neox_blocks_identities(tiny):
    """Gemma's post-norms map a zero branch to zero; NeoX's parallel branches both end in o / down."""
    for kind in ("gemma2", "gpt_neox"):
        fam = detect_family(Checkpoint.open(tiny[kind]))
        state = fam.ckpt.state_dict()
        for lin in fam.output_projections(1):
            state[lin.weight] = torch.zeros_like(state[lin.weight])
            if lin.bias:
                state[lin.bias] = torch.zeros_like(state[lin.bias])
        module = fam.build_module(state)
        inputs = fam.example_inputs(generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            hidden, ctx = module.stages().embed(**inputs)
            assert torch.equal(module.stages().blocks[1](hidden, **ctx), hidden)


def test_config_for_layers_writes_gemma_window_pattern_out(tmp_path):
    kind, config = PUBLISHED["gemma-3-1b"]
    fam = detect_family(Checkpoint.open(save_published(kind, config, tmp_path)))
    assert "layer_types" not in fam.config
    assert fam.per_layer_config()["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    cfg = fam.config_for_layers(9)
    assert cfg["num_hidden_layers"] == 9 and len(cfg["layer_types"]) == 9
    assert cfg["layer_types"][5] == "full_attention"


# ----- surgery inspect --------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "expected"), [
    ("mistral", "sliding_window=5 on all layers"), ("gemma2", "sliding_window=5 on alternate layers"),
    ("qwen3", "qwen3, 3 layers"), ("llama3", "rope llama3 x32"), ("phi3", "fused qkv"),
    ("gpt_neox", "parallel residual"), ("qwen2", "biases on k/q/v"), ("gemma3", "qk_norm"),
])
def test_inspect_shows_family_layers_and_features(tiny, kind, expected):
    from typer.testing import CliRunner

    from modelsurgery.cli.app import app

    runner = CliRunner()
    text = runner.invoke(app, ["inspect", str(tiny[kind])], env={"COLUMNS": "400"})
    assert text.exit_code == 0
    assert f"family {DECODER_FAMILY[kind]}, 3 layers" in text.stdout and expected in text.stdout
    report = json.loads(runner.invoke(app, ["inspect", str(tiny[kind]), "--json"]).stdout)
    assert report["family"] == DECODER_FAMILY[kind] and report["num_layers"] == 3
    assert report["features"] == detect_family(Checkpoint.open(tiny[kind])).features()


def test_inspect_names_the_closest_family_of_a_lookalike(tiny, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from modelsurgery.cli.app import app

    folder = tmp_path / "olmo"
    shutil.copytree(tiny["llama3"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg |= {"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(app, ["inspect", str(folder)], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert "family unknown" in result.stdout and "follow the llama layout" in result.stdout


@pytest.mark.parametrize("command", [["quantize", "--method", "rtn"], ["export"]])
def test_quantize_and_export_refuse_a_lookalike_naming_the_closest_family(tiny, tmp_path, command):
    """Operations that run the model give the family's own refusal (the closest layout), not a generic one."""
    import shutil

    from typer.testing import CliRunner

    from modelsurgery.cli.app import app

    folder = tmp_path / "olmo"
    shutil.copytree(tiny["llama3"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg |= {"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / ("out.onnx" if command[0] == "export" else "out")
    result = CliRunner().invoke(app, [command[0], str(folder), *command[1:], "-o", str(out)],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 1
    assert "model_type 'olmo2' is not a supported family" in result.output
    assert "closest family: llama" in result.output and not out.exists()
