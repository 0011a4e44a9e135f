"""GPT-2 family against transformers' own GPT2LMHeadModel / GPT2Model (eager attention)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from tests.families import onnx_max_diff
from tests.hf_tiny import load_hf, save_tiny_gpt2

TOL = 1e-4


def padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    mask[2, 3:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_dir):
    return load_hf(gpt2_dir)


def test_detects_lm_head_model(gpt2_dir):
    fam = detect_family(Checkpoint.open(gpt2_dir))
    assert fam.name == "gpt2"
    assert fam.num_layers == 3 and fam.hidden_size == 32 and fam.vocab_size == 97
    assert fam.tied_head and "lm_head.weight" not in fam.ckpt
    assert fam.norm_placement == "pre" and not fam.rotary
    assert fam.attention.num_heads == 4 and fam.attention.num_kv_heads == 4 and fam.attention.head_dim == 8
    assert fam.block_of("transformer.h.2.mlp.c_fc.weight") == (2, "mlp.c_fc.weight")
    assert fam.block_name(1, "ln_1.weight") == "transformer.h.1.ln_1.weight"


@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_transformers(gpt2_dir, hf_gpt2, masked):
    module = detect_family(Checkpoint.open(gpt2_dir)).build_module()
    ids, mask = padded_batch(97)
    mask = mask if masked else None
    with torch.no_grad():
        ours = module(input_ids=ids, attention_mask=mask)
        ref = hf_gpt2(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (3, 11, 97)
    assert (ours - ref).abs().max().item() < TOL


def test_padding_changes_nothing_before_the_pad(gpt2_dir):
    """Causal + right padding: the kept tokens' logits equal those of the unpadded shorter sequence."""
    module = detect_family(Checkpoint.open(gpt2_dir)).build_module()
    ids, mask = padded_batch(97)
    with torch.no_grad():
        full = module(input_ids=ids, attention_mask=mask)
        short = module(input_ids=ids[1:2, :8])
    assert (full[1, :8] - short[0]).abs().max().item() < TOL


def test_state_dict_names_are_checkpoint_names(gpt2_dir):
    ckpt = Checkpoint.open(gpt2_dir)
    module = detect_family(ckpt).build_module()
    assert sorted(module.state_dict()) == sorted(ckpt.keys())
    assert module.state_dict()["transformer.wte.weight"].data_ptr() == module.transformer.wte.weight.data_ptr()


def test_stages_compose_to_forward(gpt2_dir):
    fam = detect_family(Checkpoint.open(gpt2_dir))
    module = fam.build_module()
    inputs = fam.example_inputs(batch=2, seq_len=9, generator=torch.Generator().manual_seed(1))
    st = module.stages()
    assert len(st.blocks) == 3 and st.blocks[0] is module.transformer.h[0]
    with torch.no_grad():
        hidden, ctx = st.embed(**inputs)
        for block in st.blocks:
            hidden = block(hidden, **ctx)
        staged = st.head(hidden)
        direct = module(**inputs)
    assert torch.equal(staged, direct)
    assert set(inputs) == set(fam.input_names())


def test_roles_name_existing_tensors_with_expected_shapes(gpt2_dir):
    fam = detect_family(Checkpoint.open(gpt2_dir))
    ck = fam.ckpt
    inner = 4 * 32
    for i in range(fam.num_layers):
        lin = fam.block_linears(i)
        assert set(lin) == {"qkv", "o", "up", "down"}
        assert all(lin[r].transposed for r in lin)
        expected = {"qkv": (32, 96), "o": (32, 32), "up": (32, inner), "down": (inner, 32)}
        for role, shape in expected.items():
            assert ck.shape(lin[role].weight) == shape
            assert ck.shape(lin[role].bias) == (shape[1],)
        for norm in fam.block_norms(i).values():
            assert ck.shape(norm.weight) == (32,) and ck.shape(norm.bias) == (32,)
        assert [p.weight for p in fam.output_projections(i)] == [lin["o"].weight, lin["down"].weight]
    assert fam.embedding_names() == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert set(fam.head_names()) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_zeroed_output_projections_make_a_block_an_identity(gpt2_dir):
    fam = detect_family(Checkpoint.open(gpt2_dir))
    state = fam.ckpt.state_dict()
    for lin in fam.output_projections(1):
        state[lin.weight] = torch.zeros_like(state[lin.weight])
        state[lin.bias] = torch.zeros_like(state[lin.bias])
    block = fam.build_module(state).transformer.h[1]
    x = torch.randn(2, 5, 32)
    assert torch.equal(block(x), x)


def test_bare_gpt2model_without_prefix(tmp_path):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=61, n_positions=32, n_embd=24, n_layer=2, n_head=3, activation_function="relu",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2Model(cfg).eval().save_pretrained(tmp_path)
    ref = GPT2Model.from_pretrained(tmp_path, attn_implementation="eager").eval()
    fam = detect_family(Checkpoint.open(tmp_path))
    assert fam.name == "gpt2" and fam.prefix == "" and fam.tied_head
    assert fam.block_linears(1)["qkv"].weight == "h.1.attn.c_attn.weight"
    module = fam.build_module()
    ids, mask = padded_batch(61, seed=2)
    with torch.no_grad():
        ours = module(input_ids=ids, attention_mask=mask)
        hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = hidden @ ref.wte.weight.T  # the tied LM head
    assert (ours - expected).abs().max().item() < TOL


def test_untied_head(tmp_path):
    folder = save_tiny_gpt2(tmp_path, seed=4, tie_word_embeddings=False, n_layer=2)
    fam = detect_family(Checkpoint.open(folder))
    assert not fam.tied_head and "lm_head.weight" in fam.head_names()
    module = fam.build_module()
    assert module.lm_head.weight.data_ptr() != module.transformer.wte.weight.data_ptr()
    ids, mask = padded_batch(97, seed=5)
    with torch.no_grad():
        ours = module(input_ids=ids, attention_mask=mask)
        ref = load_hf(folder)(input_ids=ids, attention_mask=mask).logits
    assert (ours - ref).abs().max().item() < TOL


def test_config_for_layers_loads_in_transformers(gpt2_dir, tmp_path):
    """A 5-block model made by repeating blocks loads in transformers with the updated config and
    matches our module built from the same folder."""
    fam = detect_family(Checkpoint.open(gpt2_dir))
    cfg = fam.config_for_layers(5)
    assert cfg["n_layer"] == 5 and fam.config["n_layer"] == 3
    state = {k: v for k, v in fam.ckpt.state_dict().items() if fam.block_of(k) is None}
    for new, old in enumerate([0, 1, 1, 2, 2]):
        for name in fam.blocks()[old].names:
            state[fam.block_name(new, fam.block_of(name)[1])] = fam.ckpt.get(name).clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    grown = detect_family(Checkpoint.open(tmp_path))
    assert grown.num_layers == 5
    ids, mask = padded_batch(97)
    with torch.no_grad():
        ours = grown.build_module()(input_ids=ids, attention_mask=mask)
        ref = load_hf(tmp_path)(input_ids=ids, attention_mask=mask).logits
    assert (ours - ref).abs().max().item() < TOL


def test_without_config_sizes_come_from_shapes_and_forward_asks_for_heads(gpt2_dir):
    state = Checkpoint.open(gpt2_dir).state_dict()
    fam = detect_family(Checkpoint.from_state_dict(state, path="weights.safetensors"))
    assert fam.name == "gpt2" and fam.num_layers == 3 and fam.hidden_size == 32
    assert fam.attention is None and fam.config_for_layers(4) is None
    with pytest.raises(SurgeryError, match=r"weights\.safetensors: config\.json with 'n_head' is needed"):
        fam.build_module()


def test_unknown_activation_is_refused(gpt2_dir):
    ckpt = Checkpoint.open(gpt2_dir)
    bad = Checkpoint.from_state_dict(ckpt.state_dict(), path="m.safetensors",
                                     config={**ckpt.config, "activation_function": "mish7"})
    with pytest.raises(SurgeryError, match="m.safetensors: activation 'mish7' is not supported"):
        detect_family(bad).build_module()


def test_half_precision_checkpoint_runs(tmp_path):
    from transformers import GPT2LMHeadModel

    folder = save_tiny_gpt2(tmp_path / "src", seed=6)
    GPT2LMHeadModel.from_pretrained(folder).half().save_pretrained(tmp_path / "fp16")
    fam = detect_family(Checkpoint.open(tmp_path / "fp16"))
    assert fam.ckpt.dtype() == torch.float16
    ref = GPT2LMHeadModel.from_pretrained(tmp_path / "fp16", dtype=torch.float32,
                                          attn_implementation="eager").eval()
    ids, mask = padded_batch(97)
    with torch.no_grad():
        ours32 = fam.build_module()(input_ids=ids, attention_mask=mask)
        expected = ref(input_ids=ids, attention_mask=mask).logits
        ours16 = fam.build_module(dtype=torch.bfloat16)(input_ids=ids, attention_mask=mask)
    assert (ours32 - expected).abs().max().item() < TOL
    assert ours16.dtype == torch.bfloat16 and torch.isfinite(ours16).all()
    assert (ours16.float() - expected).abs().max().item() < 0.1 * expected.abs().max().item()


def test_onnx_export_keeps_sequence_length_dynamic(gpt2_dir, tmp_path):
    fam = detect_family(Checkpoint.open(gpt2_dir))
    trace = fam.example_inputs(batch=2, seq_len=6, generator=torch.Generator().manual_seed(0))
    ids, mask = padded_batch(97)
    diff = onnx_max_diff(fam.build_module(), fam.input_names(), trace,
                         {"input_ids": ids, "attention_mask": mask}, tmp_path)
    assert diff < TOL


def test_trained_fixture_matches_transformers(fixtures_dir):
    """The bundled character LM (trained weights, large logits) against transformers."""
    folder = fixtures_dir / "charlm" / "gpt2"
    fam = detect_family(Checkpoint.open(folder))
    assert fam.name == "gpt2"
    inputs = fam.example_inputs(batch=3, seq_len=40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = fam.build_module()(**inputs)
        ref = load_hf(folder)(**inputs).logits
    assert ref.abs().max().item() > 1.0
    assert (ours - ref).abs().max().item() < TOL


def test_legacy_attention_buffers_are_ignored(gpt2_dir):
    """Checkpoints saved by older transformers carry ``attn.bias`` (a causal mask) and
    ``attn.masked_bias`` buffers in each block; they are not weights and the module does not need them."""
    ckpt = Checkpoint.open(gpt2_dir)
    state = ckpt.state_dict()
    for i in range(3):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    fam = detect_family(Checkpoint.from_state_dict(state, config=ckpt.config))
    assert fam.name == "gpt2" and fam.num_layers == 3
    assert fam.block_linears(0)["qkv"].bias == "transformer.h.0.attn.c_attn.bias"
    ids, mask = padded_batch(97)
    with torch.no_grad():
        ours = fam.build_module()(input_ids=ids, attention_mask=mask)
        base = detect_family(ckpt).build_module()(input_ids=ids, attention_mask=mask)
    assert torch.equal(ours, base)
