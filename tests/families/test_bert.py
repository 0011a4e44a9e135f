"""BERT family against transformers' own BertModel (eager attention): last_hidden_state parity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from tests.families import onnx_max_diff
from tests.hf_tiny import load_hf, save_tiny_bert

TOL = 1e-4


def padded_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    types = torch.zeros(3, 10, dtype=torch.long)
    types[:, 5:] = 1  # second segment
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def max_diff(module, hf_bert, inputs) -> float:
    with torch.no_grad():
        ours = module(**inputs)
        expected = hf_bert(**inputs).last_hidden_state
    assert ours.shape == expected.shape
    return (ours - expected).abs().max().item()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def hf_bert(bert_dir):
    return load_hf(bert_dir)


def test_detects_bert_model(bert_dir):
    fam = detect_family(Checkpoint.open(bert_dir))
    assert fam.name == "bert" and fam.output_kind == "hidden"
    assert fam.norm_placement == "post" and not fam.rotary
    assert fam.num_layers == 3 and fam.hidden_size == 32 and fam.vocab_size == 97
    assert fam.attention.num_heads == 4 and fam.attention.head_dim == 8
    assert fam.head_names() == ["pooler.dense.bias", "pooler.dense.weight"]
    assert fam.block_of("encoder.layer.1.output.dense.weight") == (1, "output.dense.weight")
    assert fam.output_names() == ["last_hidden_state"]


@pytest.mark.parametrize("inputs", ["ids", "mask", "mask+types"])
def test_forward_matches_transformers(bert_dir, hf_bert, inputs):
    module = detect_family(Checkpoint.open(bert_dir)).build_module()
    batch = padded_batch(97)
    keep = {"ids": ["input_ids"], "mask": ["input_ids", "attention_mask"], "mask+types": list(batch)}[inputs]
    assert max_diff(module, hf_bert, {k: batch[k] for k in keep}) < TOL


def test_padding_is_not_attended(bert_dir):
    """Bidirectional + padding mask: a row's kept tokens equal the unpadded short sequence's output."""
    module = detect_family(Checkpoint.open(bert_dir)).build_module()
    batch = padded_batch(97)
    with torch.no_grad():
        full = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        short = module(input_ids=batch["input_ids"][1:2, :7])
    assert (full[1, :7] - short[0]).abs().max().item() < TOL


def test_stages_compose_to_forward(bert_dir):
    fam = detect_family(Checkpoint.open(bert_dir))
    module = fam.build_module()
    inputs = fam.example_inputs(batch=2, seq_len=6, generator=torch.Generator().manual_seed(2))
    assert set(inputs) == set(fam.input_names())
    st = module.stages()
    assert st.blocks[2] is module.encoder.layer[2]
    with torch.no_grad():
        hidden, ctx = st.embed(**inputs)
        for block in st.blocks:
            hidden = block(hidden, **ctx)
        assert torch.equal(st.head(hidden), module(**inputs))


def test_roles_name_existing_tensors_with_expected_shapes(bert_dir):
    fam = detect_family(Checkpoint.open(bert_dir))
    ck = fam.ckpt
    expected = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32), "up": (48, 32), "down": (32, 48)}
    for i in range(fam.num_layers):
        lin = fam.block_linears(i)
        assert {r: ck.shape(lin[r].weight) for r in lin} == expected
        assert all(ck.shape(lin[r].bias) == (expected[r][0],) for r in lin)
        assert lin["o"].weight == f"encoder.layer.{i}.attention.output.dense.weight"
        assert lin["up"].weight == f"encoder.layer.{i}.intermediate.dense.weight"
        assert lin["down"].weight == f"encoder.layer.{i}.output.dense.weight"
        assert all(ck.shape(n.weight) == (32,) == ck.shape(n.bias) for n in fam.block_norms(i).values())
    assert all(n in ck for n in fam.embedding_names()) and len(fam.embedding_names()) == 5


def test_post_norm_blocks_have_no_identity_projections(bert_dir):
    """Zeroing o and down leaves LayerNorm(LayerNorm(x)) != x, so output_projections is empty."""
    fam = detect_family(Checkpoint.open(bert_dir))
    assert fam.output_projections(0) == []
    state = fam.ckpt.state_dict()
    for role in ("o", "down"):
        lin = fam.block_linears(0)[role]
        state[lin.weight] = torch.zeros_like(state[lin.weight])
        state[lin.bias] = torch.zeros_like(state[lin.bias])
    block = fam.build_module(state).encoder.layer[0]
    x = torch.randn(2, 4, 32)
    assert (block(x) - x).abs().max().item() > 0.1


@pytest.mark.parametrize("task", ["sequence_classification", "masked_lm"])
def test_task_models_with_bert_prefix(tmp_path, task):
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    cls = {"sequence_classification": BertForSequenceClassification, "masked_lm": BertForMaskedLM}[task]
    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=53, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=40, max_position_embeddings=32, hidden_act="relu", num_labels=3)
    cls(cfg).eval().save_pretrained(tmp_path)
    ref = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    fam = detect_family(Checkpoint.open(tmp_path))
    assert fam.name == "bert" and fam.prefix == "bert." and fam.num_layers == 2
    assert fam.block_linears(1)["q"].weight == "bert.encoder.layer.1.attention.self.query.weight"
    heads = fam.head_names()
    assert heads and all(n.startswith(("bert.pooler.", "cls.", "classifier.")) for n in heads)
    assert any(n.startswith("classifier." if task == "sequence_classification" else "cls.") for n in heads)
    module = fam.build_module()
    assert set(module.state_dict()) <= set(fam.ckpt.keys())
    assert max_diff(module, ref.bert, padded_batch(53, seed=1)) < TOL


def test_without_pooler(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(8)
    cfg = BertConfig(vocab_size=41, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=20, max_position_embeddings=16, hidden_act="gelu_new")
    BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(tmp_path)
    fam = detect_family(Checkpoint.open(tmp_path))
    assert fam.name == "bert" and fam.head_names() == []
    module = fam.build_module()
    assert sorted(module.state_dict()) == sorted(fam.ckpt.keys())
    ref = BertModel.from_pretrained(tmp_path, attn_implementation="eager", add_pooling_layer=False).eval()
    assert max_diff(module, ref, padded_batch(41)) < TOL


def test_config_for_layers_loads_in_transformers(bert_dir, tmp_path):
    fam = detect_family(Checkpoint.open(bert_dir))
    cfg = fam.config_for_layers(2)
    assert cfg["num_hidden_layers"] == 2 and fam.config["num_hidden_layers"] == 3
    state = {k: v for k, v in fam.ckpt.state_dict().items() if fam.block_of(k) is None or fam.block_of(k)[0] != 1}
    for name in fam.blocks()[2].names:  # drop block 1: block 2 becomes block 1
        del state[name]
        state[fam.block_name(1, fam.block_of(name)[1])] = fam.ckpt.get(name).clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shrunk = detect_family(Checkpoint.open(tmp_path))
    assert shrunk.num_layers == 2
    assert max_diff(shrunk.build_module(), load_hf(tmp_path), padded_batch(97)) < TOL


def test_without_config_forward_asks_for_heads(bert_dir):
    fam = detect_family(Checkpoint.from_state_dict(Checkpoint.open(bert_dir).state_dict(), path="e.safetensors"))
    assert fam.name == "bert" and fam.num_layers == 3 and fam.attention is None
    with pytest.raises(SurgeryError, match="e.safetensors: config.json with 'num_attention_heads' is needed"):
        fam.build_module()


def test_relative_positions_are_refused(bert_dir):
    ckpt = Checkpoint.open(bert_dir)
    bad = Checkpoint.from_state_dict(ckpt.state_dict(), path="r.safetensors",
                                     config={**ckpt.config, "position_embedding_type": "relative_key"})
    with pytest.raises(SurgeryError, match="r.safetensors: position_embedding_type 'relative_key'"):
        detect_family(bad).build_module()


def test_half_precision_checkpoint_runs(tmp_path):
    from transformers import BertModel

    src = save_tiny_bert(tmp_path / "src", seed=9, num_hidden_layers=2)
    BertModel.from_pretrained(src).half().save_pretrained(tmp_path / "fp16")
    fam = detect_family(Checkpoint.open(tmp_path / "fp16"))
    assert fam.ckpt.dtype() == torch.float16
    ref32 = BertModel.from_pretrained(tmp_path / "fp16", dtype=torch.float32, attn_implementation="eager").eval()
    batch = padded_batch(97)
    assert max_diff(fam.build_module(), ref32, batch) < TOL
    with torch.no_grad():
        half = fam.build_module(dtype=torch.bfloat16)(**batch)
        expected = ref32(**batch).last_hidden_state
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - expected).abs().max().item() < 0.1 * expected.abs().max().item()


def test_onnx_export_keeps_sequence_length_dynamic(bert_dir, tmp_path):
    fam = detect_family(Checkpoint.open(bert_dir))
    trace = fam.example_inputs(batch=2, seq_len=5, generator=torch.Generator().manual_seed(0))
    diff = onnx_max_diff(fam.build_module(), fam.input_names(), trace, padded_batch(97), tmp_path)
    assert diff < TOL
