"""LLaMA family against transformers' own LlamaForCausalLM (eager attention), grouped-query attention."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.families.rope import Rope
from modelsurgery.families.transformer import apply_rotary, attend, attention_bias
from tests.families import onnx_max_diff
from tests.hf_tiny import load_hf, save_tiny_llama

TOL = 1e-4


def padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 10:] = 0  # right padding
    mask[2, 4:] = 0
    return ids, mask


def max_diff(module, ref, ids, mask) -> float:
    with torch.no_grad():
        ours = module(input_ids=ids, attention_mask=mask)
        expected = ref(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == expected.shape
    return (ours - expected).abs().max().item()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))  # 4 heads, 2 key/value heads, untied head


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    return load_hf(llama_dir)


def test_detects_llama_with_grouped_query_attention(llama_dir):
    fam = detect_family(Checkpoint.open(llama_dir))
    assert fam.name == "llama"
    assert fam.num_layers == 3 and fam.hidden_size == 32 and fam.vocab_size == 97
    att = fam.attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (4, 2, 8)
    assert fam.norm_placement == "pre" and fam.rotary
    assert not fam.tied_head and fam.head_names() == ["model.norm.weight", "lm_head.weight"]
    assert fam.block_of("model.layers.2.mlp.up_proj.weight") == (2, "mlp.up_proj.weight")


@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_transformers(llama_dir, hf_llama, masked):
    module = detect_family(Checkpoint.open(llama_dir)).build_module()
    ids, mask = padded_batch(97)
    assert max_diff(module, hf_llama, ids, mask if masked else None) < TOL


@pytest.mark.parametrize("overrides", [
    {"num_key_value_heads": 1, "tie_word_embeddings": True, "hidden_act": "gelu"},
    {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True, "rope_theta": 500.0, "rms_norm_eps": 1e-5},
    {"head_dim": 12, "num_key_value_heads": 2},
])
def test_config_variants_match_transformers(tmp_path, overrides):
    folder = save_tiny_llama(tmp_path, seed=2, num_hidden_layers=2, **overrides)
    fam = detect_family(Checkpoint.open(folder))
    assert fam.attention.num_kv_heads == overrides["num_key_value_heads"]
    assert fam.tied_head == overrides.get("tie_word_embeddings", False)
    module = fam.build_module()
    assert sorted(module.state_dict()) == sorted(fam.ckpt.keys())
    assert max_diff(module, load_hf(folder), *padded_batch(97, seed=3)) < TOL


def test_stages_compose_to_forward(llama_dir):
    fam = detect_family(Checkpoint.open(llama_dir))
    module = fam.build_module()
    inputs = fam.example_inputs(batch=3, seq_len=7, generator=torch.Generator().manual_seed(0))
    st = module.stages()
    assert [b is m for b, m in zip(st.blocks, module.model.layers)] == [True] * 3
    with torch.no_grad():
        hidden, ctx = st.embed(**inputs)
        assert set(ctx) == {"mask", "cos", "sin"}
        for block in st.blocks:
            hidden = block(hidden, **ctx)
        assert torch.equal(st.head(hidden), module(**inputs))


def test_roles_name_existing_tensors_with_expected_shapes(llama_dir):
    fam = detect_family(Checkpoint.open(llama_dir))
    ck = fam.ckpt
    expected = {"q": (32, 32), "k": (16, 32), "v": (16, 32), "o": (32, 32),
                "gate": (56, 32), "up": (56, 32), "down": (32, 56)}
    for i in range(fam.num_layers):
        lin = fam.block_linears(i)
        assert {r: ck.shape(lin[r].weight) for r in lin} == expected
        assert all(lin[r].bias is None and not lin[r].transposed for r in lin)
        norms = fam.block_norms(i)
        assert set(norms) == {"attn", "mlp"} and all(n.kind == "rmsnorm" for n in norms.values())
        assert all(ck.shape(n.weight) == (32,) for n in norms.values())
        assert [p.weight for p in fam.output_projections(i)] == [lin["o"].weight, lin["down"].weight]
    assert fam.embedding_names() == ["model.embed_tokens.weight"]


def test_zeroed_output_projections_make_a_block_an_identity(llama_dir):
    fam = detect_family(Checkpoint.open(llama_dir))
    state = fam.ckpt.state_dict()
    for lin in fam.output_projections(0):
        state[lin.weight] = torch.zeros_like(state[lin.weight])
    module = fam.build_module(state)
    inputs = fam.example_inputs(generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden, ctx = module.stages().embed(**inputs)
        assert torch.equal(module.model.layers[0](hidden, **ctx), hidden)


def test_config_for_layers_loads_in_transformers(llama_dir, tmp_path):
    fam = detect_family(Checkpoint.open(llama_dir))
    cfg = fam.config_for_layers(4)
    assert cfg["num_hidden_layers"] == 4 and fam.config["num_hidden_layers"] == 3
    state = {k: v for k, v in fam.ckpt.state_dict().items() if fam.block_of(k) is None}
    for new, old in enumerate([0, 1, 2, 2]):
        for name in fam.blocks()[old].names:
            state[fam.block_name(new, fam.block_of(name)[1])] = fam.ckpt.get(name).clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    grown = detect_family(Checkpoint.open(tmp_path))
    assert grown.num_layers == 4
    assert max_diff(grown.build_module(), load_hf(tmp_path), *padded_batch(97)) < TOL


def test_old_style_rope_config_and_missing_kv_heads(llama_dir, hf_llama):
    """Configs from transformers 4.x: rope_theta at top level, rope_scaling null, and (LLaMA 1) no
    num_key_value_heads, which then comes from the key projection's shape."""
    ckpt = Checkpoint.open(llama_dir)
    cfg = {k: v for k, v in ckpt.config.items() if k not in ("rope_parameters", "num_key_value_heads")}
    cfg.update(rope_theta=10000.0, rope_scaling=None)
    fam = detect_family(Checkpoint.from_state_dict(ckpt.state_dict(), config=cfg))
    assert fam.attention.num_kv_heads == 2
    assert max_diff(fam.build_module(), hf_llama, *padded_batch(97, seed=6)) < TOL


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},  # sequences beyond max_position_embeddings
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8, "rope_theta": 500000.0},
])
def test_scaled_rope_matches_transformers(tmp_path, rope):
    """Each rope scaling shipped LLaMA checkpoints use, against transformers' own model; max_position_embeddings
    10 puts the 12-token batch past it (dynamic NTK grows its base there)."""
    folder = save_tiny_llama(tmp_path, seed=4, num_hidden_layers=2, max_position_embeddings=10, rope_parameters=rope)
    fam = detect_family(Checkpoint.open(folder))
    assert fam.name == "llama"
    assert max_diff(fam.build_module(), load_hf(folder), *padded_batch(97, seed=5)) < TOL


@pytest.mark.parametrize(("rope", "key"), [
    ({"rope_parameters": {"rope_type": "ntk-by-parts", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_parameters.rope_type='ntk-by-parts'"),
    ({"rope_scaling": {"type": "xpos", "factor": 2.0}}, "rope_scaling.type='xpos'"),
])
def test_unknown_rope_type_is_refused_naming_the_key(llama_dir, rope, key):
    ckpt = Checkpoint.open(llama_dir)
    cfg = {k: v for k, v in ckpt.config.items() if k != "rope_parameters"} | rope
    fam = detect_family(Checkpoint.from_state_dict(ckpt.state_dict(), path="m.safetensors", config=cfg))
    assert fam.name == "llama"
    with pytest.raises(SurgeryError, match=rf"^m.safetensors: config.json {re.escape(key)} is not supported"):
        fam.build_module()


def test_missing_untied_head_is_refused(llama_dir):
    ckpt = Checkpoint.open(llama_dir)
    state = {k: v for k, v in ckpt.state_dict().items() if k != "lm_head.weight"}
    fam = detect_family(Checkpoint.from_state_dict(state, path="m.safetensors", config=ckpt.config))
    with pytest.raises(SurgeryError, match="'lm_head.weight' is missing .* tie_word_embeddings=false"):
        fam.build_module()


def test_without_config_forward_asks_for_heads(llama_dir):
    fam = detect_family(Checkpoint.from_state_dict(Checkpoint.open(llama_dir).state_dict(), path="w.safetensors"))
    assert fam.name == "llama" and fam.num_layers == 3 and fam.hidden_size == 32
    assert fam.attention is None
    with pytest.raises(SurgeryError, match="w.safetensors: config.json with 'num_attention_heads' is needed"):
        fam.build_module()


def test_other_model_type_is_not_claimed(llama_dir):
    ckpt = Checkpoint.open(llama_dir)
    other = Checkpoint.from_state_dict(ckpt.state_dict(), config={**ckpt.config, "model_type": "mistral"})
    assert detect_family(other).name != "llama"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_runs(tmp_path, dtype):
    from transformers import LlamaForCausalLM

    src = save_tiny_llama(tmp_path / "src", seed=7, num_hidden_layers=2)
    LlamaForCausalLM.from_pretrained(src).to(dtype).save_pretrained(tmp_path / "half")
    fam = detect_family(Checkpoint.open(tmp_path / "half"))
    assert fam.ckpt.dtype() == dtype
    ref32 = LlamaForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32,
                                             attn_implementation="eager").eval()
    ids, mask = padded_batch(97)
    assert max_diff(fam.build_module(), ref32, ids, mask) < TOL
    with torch.no_grad():
        half = fam.build_module(dtype=dtype)(input_ids=ids, attention_mask=mask)
        expected = ref32(input_ids=ids, attention_mask=mask).logits
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert (half.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_onnx_export_keeps_sequence_length_dynamic(llama_dir, tmp_path):
    fam = detect_family(Checkpoint.open(llama_dir))
    trace = fam.example_inputs(batch=2, seq_len=5, generator=torch.Generator().manual_seed(0))
    ids, mask = padded_batch(97)
    diff = onnx_max_diff(fam.build_module(), fam.input_names(), trace,
                         {"input_ids": ids, "attention_mask": mask}, tmp_path)
    assert diff < TOL


def test_trained_fixture_matches_transformers(fixtures_dir):
    """The bundled character LM (trained weights, large logits) against transformers."""
    folder = fixtures_dir / "charlm" / "llama"
    fam = detect_family(Checkpoint.open(folder))
    assert fam.name == "llama" and fam.attention.num_kv_heads < fam.attention.num_heads
    inputs = fam.example_inputs(batch=3, seq_len=40, generator=torch.Generator().manual_seed(0))
    assert max_diff(fam.build_module(), load_hf(folder), inputs["input_ids"], inputs["attention_mask"]) < TOL


def test_forcing_the_family_on_other_tensors_is_refused():
    from modelsurgery.families import family_by_name

    other = Checkpoint.from_state_dict({"0.weight": torch.zeros(2, 2)}, path="mlp.safetensors")
    for name, expected in (("llama", "model.embed_tokens.weight"), ("gpt2", "wte.weight"),
                           ("bert", "embeddings.word_embeddings.weight")):
        with pytest.raises(SurgeryError, match=f"mlp.safetensors: not a .* checkpoint .*{expected}"):
            family_by_name(name)(other)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(0, 40), shift=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_rotary_scores_depend_only_on_relative_position(m, n, shift, seed):
    """RoFormer's property: <R(m) q, R(n) k> = <R(m+s) q, R(n+s) k>, and rotation keeps the norm."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 16, generator=g, dtype=torch.float64)
    cos, sin = Rope("default", 10000.0, 16, 64).tables(torch.zeros(1, 64, dtype=torch.long), torch.float64)

    def rot(x, p):
        return apply_rotary(x, cos[0, 0, p], sin[0, 0, p])

    # the tables hold float32 angles (as LLaMA computes them), so the property holds to float32 precision
    assert torch.allclose(rot(q, m) @ rot(k, n), rot(q, m + shift) @ rot(k, n + shift), atol=1e-5)
    assert torch.allclose(rot(q, m).norm(), q.norm(), atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(kv=st.sampled_from([1, 2, 4]), t=st.integers(1, 7), pad=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_grouped_attention_matches_a_per_head_loop(kv, t, pad, seed):
    """attend() against a hand-written loop: query head h uses key/value head h // (H / KV), a causal
    mask, and right padding of the second sequence."""
    g = torch.Generator().manual_seed(seed)
    heads, d = 4, 3
    q = torch.randn(2, heads, t, d, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, kv, t, d, generator=g, dtype=torch.float64)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, max(1, t - pad):] = 0
    ids = torch.zeros(2, t, dtype=torch.long)
    out = attend(q, k, v, attention_bias(ids, mask, causal=True, dtype=torch.float64), d ** -0.5)
    for b in range(2):
        for h in range(heads):
            kh, vh = k[b, h // (heads // kv)], v[b, h // (heads // kv)]
            for i in range(t):
                keep = [j for j in range(i + 1) if mask[b, j]]
                w = torch.softmax(torch.stack([q[b, h, i] @ kh[j] for j in keep]) * d ** -0.5, 0)
                expected = sum(wj * vh[j] for wj, j in zip(w, keep))
                assert torch.allclose(out[b, i, h * d:(h + 1) * d], expected, atol=1e-12)


def test_config_for_layers_resizes_per_layer_types(llama_dir):
    ckpt = Checkpoint.open(llama_dir)
    cfg = {**ckpt.config, "layer_types": ["full_attention"] * 3}
    fam = detect_family(Checkpoint.from_state_dict(ckpt.state_dict(), config=cfg))
    assert fam.config_for_layers(5)["layer_types"] == ["full_attention"] * 5
    assert fam.config_for_layers(2)["layer_types"] == ["full_attention"] * 2
