"""Decoder classifiers (transformers' ...ForSequenceClassification: the decoder's names plus 'score.weight'
[num_labels, hidden], no LM head). Weight matching permutes the residual stream; the families do not describe
the classification head, which reads that stream, so matching is refused in one line, nothing written. Merges
without matching need no permutation and are checked against transformers' forward of averaged weights."""

import pytest
import torch
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.analyze import AnalyzeOptions, analyze_pair
from modelsurgery.ops.merge.merge import MergeOptions, merge_checkpoints

KINDS = {
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", {
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 56, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}),
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification", {
        "vocab_size": 97, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
}


def save_classifier(kind, folder, seed):
    import transformers

    config_cls, model_cls, cfg = KINDS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**cfg, num_labels=3, pad_token_id=0)
    getattr(transformers, model_cls)(config).eval().save_pretrained(folder)
    return folder


def load_classifier(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_matching_a_classifier_is_refused_naming_its_head(tmp_path, kind):
    a, b = (save_classifier(kind, tmp_path / f"m{i}", i) for i in (0, 1))
    with pytest.raises(SurgeryError, match=r"tensor 'score\.weight'.*residual stream") as e:
        merge_checkpoints([a, b], tmp_path / "out", MergeOptions())
    assert "\n" not in str(e.value)
    with pytest.raises(SurgeryError, match=r"tensor 'score\.weight'"):
        merge_checkpoints([a, b], tmp_path / "out", MergeOptions(method="slerp", align=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1"]
    # analyze compares the tensors the spec permutes and writes nothing: the head is left out, not refused
    layers = [x.name for x in analyze_pair(a, b, AnalyzeOptions(top_k=1)).layers]
    assert layers and "score.weight" not in layers


def test_the_cli_refuses_in_one_line(tmp_path):
    a, b = (save_classifier("qwen2", tmp_path / f"m{i}", i) for i in (0, 1))
    r = CliRunner().invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "score.weight" in lines[0], r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_merging_classifiers_without_matching_is_the_average_in_transformers(tmp_path, kind, method):
    a, b = (save_classifier(kind, tmp_path / f"m{i}", i) for i in (0, 1))
    out = tmp_path / "out"
    merge_checkpoints([a, b], out, MergeOptions(method=method))
    ma, mb, merged = load_classifier(a), load_classifier(b), load_classifier(out)
    reference = load_classifier(a)
    with torch.no_grad():
        pb = dict(mb.named_parameters())
        for name, p in reference.named_parameters():  # linear at 1/2 (slerp: the angle formula, checked below)
            p.copy_((p + pb[name]) / 2)
        ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))
        got, want = merged(input_ids=ids).logits, reference(input_ids=ids).logits
    if method == "linear":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # slerp of two random tensors is not their mean; the score head must be merged like any tensor
        pa, pm = dict(ma.named_parameters()), dict(merged.named_parameters())
        head = next(n for n in pm if n.startswith("score"))
        x, y = pa[head].flatten().double(), pb[head].flatten().double()
        w = torch.arccos((x / x.norm()) @ (y / y.norm()))
        expected = (torch.sin(w / 2) / torch.sin(w)) * (x + y)
        torch.testing.assert_close(pm[head].flatten().double(), expected, atol=1e-6, rtol=1e-5)
    assert got.shape == (2, 3)


def test_any_head_reading_the_stream_is_refused_not_only_score(tmp_path):
    """GPT2ForTokenClassification's 'classifier.weight' [labels, hidden]: the guard is the spec's, not a name."""
    from transformers import GPT2Config, GPT2ForTokenClassification

    _, _, cfg = KINDS["gpt2"]
    paths = []
    for i in (0, 1):
        torch.manual_seed(i)
        GPT2ForTokenClassification(GPT2Config(**cfg, num_labels=5)).save_pretrained(tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    with pytest.raises(SurgeryError, match=r"tensor 'classifier\.weight' \(5, 32\) reads the residual stream"):
        merge_checkpoints(paths, tmp_path / "out", MergeOptions())
    assert not (tmp_path / "out").exists()


def test_a_bare_gpt2_model_matched_with_a_permuted_copy_gives_the_first_models_hidden_states(tmp_path):
    """A bare GPT2Model (no head: transformers returns hidden states) is matched as the language model the gpt2
    family reads it as; the merge is in the first model's basis, so its hidden states are the first model's, in
    the first model's order (README, Merge)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2Model

    from modelsurgery.checkpoint import Checkpoint
    from modelsurgery.families import detect_family
    from modelsurgery.ops.match.derive import permutation_spec
    from modelsurgery.ops.match.spec import apply_permutation
    from tests.ops.match.perms import random_perms

    _, _, cfg = KINDS["gpt2"]
    torch.manual_seed(0)
    GPT2Model(GPT2Config(**cfg)).save_pretrained(tmp_path / "a")
    a = Checkpoint.open(tmp_path / "a")
    spec = permutation_spec(detect_family(a))
    assert "residual" in spec.groups
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    save_file(apply_permutation(a.state_dict(), spec, random_perms(spec, torch.Generator().manual_seed(1))),
              str(tmp_path / "b" / "model.safetensors"), metadata={"format": "pt"})
    merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "out", MergeOptions())
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, permuted, got = (GPT2Model.from_pretrained(tmp_path / n, attn_implementation="eager").eval()(ids)
                               .last_hidden_state for n in ("a", "b", "out"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(permuted, want, atol=1e-3)  # B's own hidden states are in another order
