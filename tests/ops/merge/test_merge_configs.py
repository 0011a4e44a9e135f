"""Merging models whose config.json differ: structural keys (the same weights computing another function) are
refused naming both files, the key and both values; numeric settings fine-tunes may differ in (rope, eps,
context length, window) are noted and recorded; keys that change nothing (names, versions, dtype, token ids,
transformers 4.x vs 5.x spellings of the same rope) merge silently. transformers' own models are the
reference for "computes another function"."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.cli.app import app
from tests.hf_tiny import DECODER_FAMILY, load_hf, save_tiny_bert, save_tiny_decoder, save_tiny_gpt2, save_tiny_llama

runner = CliRunner()


def variant(src, dst, drop=(), **changes):
    """A copy of the folder ``src`` (same weights) whose config.json has ``changes`` and lacks ``drop``."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in drop}
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def logits(folder, ids):
    """transformers' output for ``ids``: an LM's logits, BERT's last hidden state."""
    with torch.no_grad():
        out = load_hf(folder).float()(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def merge(*args):
    return runner.invoke(app, ["merge", *map(str, args)])


STRUCTURAL = [
    # same tensor shapes (q 32x32, k/v 16x32): 4 heads of 8 or 8 heads of 4
    ("llama", {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 4}, "num_attention_heads", "4", "8"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act", "'silu'", "'gelu'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 2, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}, "layer_types",
     "full_attention", "sliding_attention"),
    ("gpt2", {"n_head": 8}, "n_head", "4", "8"),
    ("gpt2", {"activation_function": "relu"}, "activation_function", "'gelu_new'", "'relu'"),
    ("bert", {"num_attention_heads": 2}, "num_attention_heads", "4", "2"),
]


def _source(kind, folder):
    if kind == "llama":
        return save_tiny_llama(folder, seed=0)
    if kind == "gpt2":
        return save_tiny_gpt2(folder, seed=0)
    if kind == "bert":
        return save_tiny_bert(folder, seed=0)
    return save_tiny_decoder(kind, folder, seed=0)


@pytest.mark.parametrize("kind, changes, key, first, second", STRUCTURAL)
def test_structural_difference_refused(tmp_path, kind, changes, key, first, second):
    a = _source(kind, tmp_path / "a")
    b = variant(a, tmp_path / "b", **changes)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    # the premise, by transformers: the same weights under b's config compute another function
    assert not torch.allclose(logits(a, ids), logits(b, ids), atol=1e-4)
    before = snapshot(tmp_path)
    for method in (["--method", "linear"], []):
        r = merge(a, b, "-o", tmp_path / "m", *method)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1, r.output
        assert str(b / "config.json") in lines[0] and str(a / "config.json") in lines[0], lines[0]
        assert f"{key}=" in lines[0] and first in lines[0] and second in lines[0], lines[0]
        assert snapshot(tmp_path) == before


def test_base_model_with_other_heads_refused(tmp_path):
    """task arithmetic/TIES subtract the base: a base computing another function is refused as well."""
    a = save_tiny_llama(tmp_path / "a", seed=0)
    b = save_tiny_llama(tmp_path / "b", seed=1)
    base = variant(save_tiny_llama(tmp_path / "base0", seed=2), tmp_path / "base", num_attention_heads=8,
                   num_key_value_heads=4, head_dim=4)
    before = snapshot(tmp_path)
    r = merge(a, b, "--method", "ties", "--base", base, "-o", tmp_path / "m")
    assert r.exit_code == 1 and "num_attention_heads=8" in r.output and str(base / "config.json") in r.output
    assert snapshot(tmp_path) == before


def test_irrelevant_keys_and_transformers_4_spelling_merge_silently(tmp_path):
    """Names, versions, dtype, architectures, cache and token ids change nothing computed; transformers 4.x writes
    rope_theta/rope_scaling where 5.x writes rope_parameters, and a key left out reads as its default."""
    a = save_tiny_llama(tmp_path / "a", seed=0)
    b = variant(save_tiny_llama(tmp_path / "b0", seed=1), tmp_path / "b",
                drop=("rope_parameters", "dtype", "rms_norm_eps", "head_dim"),
                _name_or_path="someone/llama-ft", transformers_version="4.44.0", torch_dtype="float32",
                architectures=["LlamaForCausalLM"], use_cache=False, bos_token_id=5, eos_token_id=[6, 7],
                pad_token_id=0, rope_theta=10000.0, rope_scaling=None)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    # the premise: b computes as b0 did (transformers reads both spellings alike)
    torch.testing.assert_close(logits(tmp_path / "b0", ids), logits(b, ids), atol=1e-5, rtol=0)
    r = merge(a, b, "-o", tmp_path / "m", "--method", "linear")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    recorded = json.loads(Checkpoint.open(tmp_path / "m").metadata["modelsurgery"])["parameters"]
    assert "config_differences" not in recorded


@pytest.mark.parametrize("kind, changes, key", [
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "rope_theta"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_scaling"),
    ("llama", {"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ("llama", {"max_position_embeddings": 128}, "max_position_embeddings"),
    ("mistral", {"sliding_window": 3}, "sliding_window"),
    ("gpt2", {"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
])
def test_tuning_difference_merges_with_a_note_and_a_record(tmp_path, kind, changes, key):
    """Fine-tunes of one model may differ in numeric settings on purpose (a long-context tune's rope base): the
    merge runs, warns naming the key and both values, records them, and carries the first model's config."""
    a = _source(kind, tmp_path / "a")
    b = variant(_source(kind, tmp_path / "b0"), tmp_path / "b", **changes)
    r = merge(a, b, "-o", tmp_path / "m", "--method", "linear", "--json")
    assert r.exit_code == 0, r.output
    warning = next(line for line in r.stderr.splitlines() if "warning" in line)
    assert f"config.json {key} differs" in warning and str(b / "config.json") in warning, r.stderr
    recorded = json.loads(Checkpoint.open(tmp_path / "m").metadata["modelsurgery"])["parameters"]
    values = recorded["config_differences"][key]
    assert set(values) == {str(a / "config.json"), str(b / "config.json")}
    assert values[str(a / "config.json")] != values[str(b / "config.json")]
    assert recorded["config_from"] == str(a / "config.json")
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == json.loads((a / "config.json").read_text())
    assert any(f"config.json {key} differs" in note for note in json.loads(r.stdout)["notes"])


def test_tied_head_follows_the_tensors(tmp_path):
    """transformers 5 keeps a head the file holds whatever tie_word_embeddings says (it computes the same), so a
    flag alone merges; a tied model (no lm_head.weight) and an untied one are refused by their tensors."""
    a = save_tiny_llama(tmp_path / "a", seed=0)
    flagged = variant(a, tmp_path / "flagged", tie_word_embeddings=True)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(a, ids), logits(flagged, ids))
    r = merge(a, flagged, "-o", tmp_path / "m", "--method", "linear")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    tied = save_tiny_llama(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    r = merge(a, tied, "-o", tmp_path / "t", "--method", "linear")
    assert r.exit_code == 1 and "'lm_head.weight'" in r.output and not (tmp_path / "t").exists()


def test_declared_defaults_are_transformers_defaults():
    """A key config.json leaves out is compared at the family's declared default: it must be what transformers'
    config class assumes (GPT2Config, BertConfig)."""
    from transformers import BertConfig, GPT2Config

    from modelsurgery.families.bert import BertFamily
    from modelsurgery.families.gpt2 import GPT2Family

    checked = 0
    for family, config in ((GPT2Family, GPT2Config()), (BertFamily, BertConfig())):
        written = config.to_dict()
        for key, value in family.config_defaults.items():
            if key == "position_embedding_type" and key not in written:
                continue  # transformers 5's BERT dropped the key: absolute positions only, our default
            assert written[key] == value, (family.name, key)
            checked += 1
    assert checked == len(GPT2Family.config_defaults) + len(BertFamily.config_defaults) - 1


@pytest.mark.parametrize("kind", sorted(DECODER_FAMILY))
def test_every_decoder_family_reads_its_own_config_alike(tmp_path, kind):
    """Two seeds of one configuration (every decoder family: llama3 rope, Gemma 3's two ropes, Phi-3, NeoX's partial
    rotary) have nothing to report; a structural key changed in one is refused naming it."""
    from modelsurgery.errors import SurgeryError
    from modelsurgery.families import detect_family
    from modelsurgery.ops.merge.configs import compare_configs

    a = save_tiny_decoder(kind, tmp_path / "a", seed=0)
    b = variant(save_tiny_decoder(kind, tmp_path / "b0", seed=1), tmp_path / "b", _name_or_path="b")
    ckpts = [Checkpoint.open(a), Checkpoint.open(b)]
    families = [detect_family(c) for c in ckpts]
    assert families[0].structural_config_keys and families[0].tuning_config_keys
    assert compare_configs(list(zip(ckpts, families))) == []
    key = families[0].structural_config_keys[0]  # num_attention_heads: 4 -> 2 heads of twice the head_dim
    cfg = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**cfg, key: 2, "head_dim": 2 * families[0].attention.head_dim,
                                               "num_key_value_heads": 1}))
    other = Checkpoint.open(b)
    with pytest.raises(SurgeryError, match=f"config.json {key}=2, but .* has {key}=4"):
        compare_configs([(ckpts[0], families[0]), (other, detect_family(other))])
