"""Weight Aligning: gamma by hand, both norms, bias options, the cap, several groups, idempotence,
--eval against an independently built model, and bad input (one-line error, nothing written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.align import AlignOptions, align_checkpoint, parse_class_groups

# classifier rows: old classes 0-1, new classes 2-3 (hand-friendly numbers)
HEAD = torch.tensor([[1.0, -1.0], [2.0, 0.0], [3.0, 1.0], [0.0, -4.0]])
HEAD_BIAS = torch.tensor([0.5, -0.5, 1.0, 2.0])


def save_mlp(path: Path, head: torch.Tensor = HEAD, bias: torch.Tensor | None = HEAD_BIAS, seed: int = 0,
             in_features: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"0.weight": torch.randn(head.shape[1], in_features, generator=g),
          "0.bias": torch.randn(head.shape[1], generator=g), "2.weight": head.clone()}
    if bias is not None:
        sd["2.bias"] = bias.clone()
    save_file(sd, str(path), metadata={"format": "pt", "modelsurgery.activation": "relu"})
    return sd


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----- gamma by hand ---------------------------------------------------------------------------
def test_gamma_l1_by_hand(tmp_path):
    sd = save_mlp(tmp_path / "m.safetensors")
    rep = align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors",
                           AlignOptions(old_classes=2, norm=1, bias="keep"))
    # L1 norms: old |1|+|-1| = 2, |2|+0 = 2 -> mean 2; new 3+1 = 4, 0+4 = 4 -> mean 4; gamma = 0.5
    assert rep.groups[1].gamma == pytest.approx(0.5)
    assert rep.groups[1].mean_norm_before == pytest.approx(4.0)
    assert rep.groups[1].mean_norm_after == pytest.approx(2.0)
    assert not rep.groups[1].capped
    out = load_file(str(tmp_path / "a.safetensors"))
    torch.testing.assert_close(out["2.weight"], torch.tensor([[1.0, -1.0], [2.0, 0.0], [1.5, 0.5], [0.0, -2.0]]))
    torch.testing.assert_close(out["2.bias"], HEAD_BIAS)  # --bias keep
    for k in ("0.weight", "0.bias"):
        assert torch.equal(out[k], sd[k])


def test_gamma_l2_by_hand_and_bias_scaled(tmp_path):
    save_mlp(tmp_path / "m.safetensors")
    rep = align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors",
                           AlignOptions(old_classes=2, norm=2, bias="scale"))
    gamma = ((math.sqrt(2) + 2) / 2) / ((math.sqrt(10) + 4) / 2)
    assert rep.groups[1].gamma == pytest.approx(gamma, rel=1e-9)
    out = load_file(str(tmp_path / "a.safetensors"))
    torch.testing.assert_close(out["2.weight"][2:], HEAD[2:] * gamma)
    torch.testing.assert_close(out["2.weight"][:2], HEAD[:2], rtol=0, atol=0)
    torch.testing.assert_close(out["2.bias"], torch.tensor([0.5, -0.5, 1.0 * gamma, 2.0 * gamma]))


def test_negative_share_and_per_class_norms(tmp_path):
    save_mlp(tmp_path / "m.safetensors")
    rep = align_checkpoint(tmp_path / "m.safetensors", None, AlignOptions(old_classes=2, norm=1))
    assert rep.negative_share == pytest.approx(2 / 8)  # -1 and -4 among 8 weights
    assert rep.norms_before == pytest.approx([2.0, 2.0, 4.0, 4.0])
    assert rep.norms_after == pytest.approx([2.0, 2.0, 2.0, 2.0])
    assert rep.output is None and rep.files == []
    assert leftovers(tmp_path) == ["m.safetensors"]


# ----- the cap -----------------------------------------------------------------------------------
def test_cap_leaves_a_model_whose_premise_fails_alone(tmp_path):
    head = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 1.0], [2.0, 0.0]])  # new rows smaller: gamma 2
    sd = save_mlp(tmp_path / "m.safetensors", head=head)
    rep = align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors", AlignOptions(old_classes=2))
    g = rep.groups[1]
    assert g.gamma_raw == pytest.approx(2.0) and g.gamma == 1.0 and g.capped
    assert not rep.changed
    assert len(rep.warnings) == 1 and "premise" in rep.warnings[0] and "--no-clamp" in rep.warnings[0]
    out = load_file(str(tmp_path / "a.safetensors"))
    assert all(torch.equal(out[k], sd[k]) for k in sd)

    rep = align_checkpoint(tmp_path / "m.safetensors", tmp_path / "b.safetensors",
                           AlignOptions(old_classes=2, clamp=False, bias="keep"))
    assert rep.groups[1].gamma == pytest.approx(2.0) and not rep.groups[1].capped
    assert rep.warnings and "UP" in rep.warnings[0]
    out = load_file(str(tmp_path / "b.safetensors"))
    torch.testing.assert_close(out["2.weight"][2:], head[2:] * 2)


# ----- several incremental steps -------------------------------------------------------------
def test_each_later_group_is_aligned_to_the_first(tmp_path):
    head = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [3.0, 1.0], [0.0, 8.0], [4.0, 4.0]])
    save_mlp(tmp_path / "m.safetensors", head=head, bias=torch.arange(6.0))
    rep = align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors",
                           AlignOptions(groups=parse_class_groups("0:2,2:4,4:6"), norm=1))
    # L1: reference mean 2; group 2:4 mean 4 -> 0.5; group 4:6 mean 8 -> 0.25
    assert [g.gamma for g in rep.groups] == pytest.approx([1.0, 0.5, 0.25])
    out = load_file(str(tmp_path / "a.safetensors"))
    expected = torch.cat([head[:2], head[2:4] * 0.5, head[4:] * 0.25])
    torch.testing.assert_close(out["2.weight"], expected)
    torch.testing.assert_close(out["2.bias"], torch.tensor([0.0, 1.0, 1.0, 1.5, 1.0, 1.25]))


def test_rows_outside_the_groups_stay(tmp_path):
    head = torch.tensor([[1.0, 1.0], [9.0, 9.0], [2.0, 2.0], [4.0, 4.0]])
    save_mlp(tmp_path / "m.safetensors", head=head)
    align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors",
                     AlignOptions(groups=[(0, 1), (2, 4)], norm=2))
    out = load_file(str(tmp_path / "a.safetensors"))["2.weight"]
    assert torch.equal(out[1], head[1])
    torch.testing.assert_close(out[2:], head[2:] * (math.sqrt(2) / (3 * math.sqrt(2))))


# ----- idempotence (property) -----------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), classes=st.integers(3, 12), old=st.integers(1, 11),
       norm=st.sampled_from([1, 2]), bias=st.sampled_from(["scale", "keep"]), clamp=st.booleans(),
       new_scale=st.floats(0.2, 5.0))
def test_align_twice_equals_once(tmp_path_factory, seed, classes, old, norm, bias, clamp, new_scale):
    old = min(old, classes - 1)
    tmp = tmp_path_factory.mktemp("idem")
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(classes, 5, generator=g)
    head[old:] *= new_scale
    save_mlp(tmp / "m.safetensors", head=head, bias=torch.randn(classes, generator=g))
    opts = {"old_classes": old, "norm": norm, "bias": bias, "clamp": clamp}
    first = align_checkpoint(tmp / "m.safetensors", tmp / "once.safetensors", AlignOptions(**opts))
    second = align_checkpoint(tmp / "once.safetensors", tmp / "twice.safetensors", AlignOptions(**opts))
    once, twice = load_file(str(tmp / "once.safetensors")), load_file(str(tmp / "twice.safetensors"))
    assert all(torch.equal(once[k], twice[k]) for k in once)
    assert not second.changed
    g1 = first.groups[1]
    if g1.gamma != 1.0:  # aligned: both groups now share a mean norm
        assert g1.mean_norm_after == pytest.approx(first.groups[0].mean_norm_before, rel=1e-5)


# ----- --eval against an independent computation ------------------------------------------------
def test_eval_matches_an_independent_model(tmp_path):
    g = torch.Generator().manual_seed(3)
    head = torch.randn(6, 8, generator=g)
    head[3:] *= 3  # new classes 3-5 dominate
    sd = {"0.weight": torch.randn(8, 4, generator=g), "0.bias": torch.randn(8, generator=g),
          "2.weight": head, "2.bias": torch.randn(6, generator=g)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    x, y = torch.randn(300, 4, generator=g), torch.randint(0, 6, (300,), generator=g)
    torch.save({"inputs": x, "labels": y}, tmp_path / "eval.pt")
    rep = align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors",
                           AlignOptions(old_classes=3, norm=2, eval_data=tmp_path / "eval.pt"))

    def reference(state):
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
        net.load_state_dict(state)
        with torch.no_grad():
            pred = net(x).argmax(1).tolist()
        labels = y.tolist()
        hits = [p == t for p, t in zip(pred, labels)]
        old = [h for h, t in zip(hits, labels) if t < 3]
        new = [h for h, t in zip(hits, labels) if t >= 3]
        return {"accuracy": sum(hits) / len(hits), "accuracy_old": sum(old) / len(old),
                "accuracy_new": sum(new) / len(new), "new_prediction_share": sum(p >= 3 for p in pred) / len(pred)}

    after_state = load_file(str(tmp_path / "a.safetensors"))
    for when, state in (("before", sd), ("after", after_state)):
        got, want = rep.eval[when], reference(state)
        for k, v in want.items():
            assert got[k] == pytest.approx(v), (when, k)
    assert rep.eval["after"]["new_prediction_share"] < rep.eval["before"]["new_prediction_share"]


# ----- the bundled class-incremental fixtures ----------------------------------------------------
def test_fixture_alignment_lifts_the_clipped_model_and_cap_protects_the_unclipped(fixtures_dir, tmp_path):
    clipped = fixtures_dir / "digits" / "incremental_clipped.safetensors"
    unclipped = fixtures_dir / "digits" / "incremental_unclipped.safetensors"
    data = fixtures_dir / "data" / "digits_eval.safetensors"
    if not (clipped.is_file() and unclipped.is_file() and data.is_file()):
        pytest.skip("class-incremental fixtures not generated (python fixtures/make_incremental.py)")
    rep = align_checkpoint(clipped, None, AlignOptions(old_classes=5, eval_data=data))
    assert rep.negative_share == 0.0 and rep.groups[1].gamma < 1.0
    assert rep.eval["after"]["accuracy"] > rep.eval["before"]["accuracy"] + 0.03
    assert rep.eval["after"]["new_prediction_share"] < rep.eval["before"]["new_prediction_share"]

    capped = align_checkpoint(unclipped, None, AlignOptions(old_classes=5, eval_data=data))
    assert capped.groups[1].capped and not capped.changed and capped.warnings
    assert capped.eval["after"] == capped.eval["before"]
    blind = align_checkpoint(unclipped, None, AlignOptions(old_classes=5, eval_data=data, clamp=False))
    assert blind.eval["after"]["accuracy"] < blind.eval["before"]["accuracy"]


# ----- folders, metadata, provenance -----------------------------------------------------------
def test_folder_in_folder_out_keeps_config_extra_files_and_metadata(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    sd = save_mlp(src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"num_classes": 4}))
    (src / "labels.txt").write_text("a\nb\nc\nd\n")
    rep = align_checkpoint(src, tmp_path / "aligned", AlignOptions(old_classes=2))
    out = tmp_path / "aligned"
    assert json.loads((out / "config.json").read_text()) == {"num_classes": 4}
    assert (out / "labels.txt").read_text() == "a\nb\nc\nd\n"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        md = f.metadata()
        assert sorted(f.keys()) == sorted(sd)
    assert md["modelsurgery.activation"] == "relu"
    prov = json.loads(md["modelsurgery"])
    assert prov["operation"] == "align" and prov["parameters"]["old_classes"] == 2
    assert rep.changed


# ----- bad input: one line, nothing written ----------------------------------------------------
@pytest.mark.parametrize("options, words", [
    (AlignOptions(old_classes=0), ["'2.weight'", "out of range"]),
    (AlignOptions(old_classes=4), ["'2.weight'", "out of range"]),
    (AlignOptions(old_classes=-1), ["out of range"]),
    (AlignOptions(layer="classifier", old_classes=2), ["no layer or tensor named 'classifier'"]),
    (AlignOptions(layer="0.bias", old_classes=2), ["'0.bias'", "not a Linear"]),
    (AlignOptions(groups=[(0, 2), (1, 4)]), ["overlaps"]),
    (AlignOptions(groups=[(0, 2), (2, 9)]), ["outside 0:4"]),
    (AlignOptions(), ["exactly one"]),
    (AlignOptions(old_classes=2, norm=3), ["--norm 3"]),
    (AlignOptions(old_classes=2, bias="drop"), ["--bias drop"]),
    (AlignOptions(old_classes=2, eval_data=Path("missing.safetensors")), ["missing.safetensors"]),
])
def test_bad_input_one_line_nothing_written(tmp_path, options, words):
    save_mlp(tmp_path / "m.safetensors")
    if options.eval_data is not None:
        options.eval_data = tmp_path / options.eval_data
    with pytest.raises(SurgeryError) as e:
        align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors", options)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert leftovers(tmp_path) == ["m.safetensors"]


def test_a_layer_of_one_class_is_refused_in_one_line(tmp_path):
    save_file({"0.weight": torch.randn(3, 4), "1.weight": torch.randn(1, 3)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(SurgeryError, match=r"'1.weight': 1 class row\(s\); aligning needs"):
        align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors", AlignOptions(old_classes=1))
    assert leftovers(tmp_path) == ["m.safetensors"]


def test_no_linear_classifier_found(tmp_path):
    save_file({"features.weight": torch.randn(4, 3, 3, 3), "scale": torch.ones(4)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(SurgeryError, match="no Linear classifier found.*--layer") as e:
        align_checkpoint(tmp_path / "c.safetensors", tmp_path / "a.safetensors", AlignOptions(old_classes=2))
    assert "c.safetensors" in str(e.value)
    assert leftovers(tmp_path) == ["c.safetensors"]


def test_bad_class_groups_text():
    assert parse_class_groups("0:50, 50:60,60:70") == [(0, 50), (50, 60), (60, 70)]
    with pytest.raises(SurgeryError, match="start:end"):
        parse_class_groups("0-50,50-60")


def test_existing_output_refused_before_work(tmp_path):
    save_mlp(tmp_path / "m.safetensors")
    (tmp_path / "a.safetensors").write_bytes(b"keep me")
    with pytest.raises(SurgeryError, match="already exists"):
        align_checkpoint(tmp_path / "m.safetensors", tmp_path / "a.safetensors", AlignOptions(old_classes=2))
    assert (tmp_path / "a.safetensors").read_bytes() == b"keep me"


def test_named_layer_and_transposed_style_lookup(tmp_path):
    save_mlp(tmp_path / "m.safetensors")
    by_module = align_checkpoint(tmp_path / "m.safetensors", None, AlignOptions(old_classes=2, layer="2"))
    by_tensor = align_checkpoint(tmp_path / "m.safetensors", None, AlignOptions(old_classes=2, layer="2.weight"))
    assert by_module.layer == by_tensor.layer == "2.weight" and by_module.bias_name == "2.bias"
    hidden = align_checkpoint(tmp_path / "m.safetensors", None, AlignOptions(old_classes=1, layer="0"))
    assert hidden.layer == "0.weight" and len(hidden.norms_before) == 2


def test_transposed_weights_align_like_their_transpose():
    from modelsurgery.ops.align import weight_align

    g = torch.Generator().manual_seed(1)
    rows = torch.randn(7, 5, generator=g)
    rows[3:] *= 2
    plain, _, rep_plain = weight_align(rows, None, [(0, 3), (3, 7)], norm=2)
    stored, _, rep_t = weight_align(rows.t().contiguous(), None, [(0, 3), (3, 7)], norm=2, transposed=True)
    torch.testing.assert_close(stored, plain.t())
    assert rep_t[1].gamma == pytest.approx(rep_plain[1].gamma)


def test_half_precision_kept(tmp_path):
    sd = {k: v.half() for k, v in save_mlp(tmp_path / "m.safetensors").items()}
    save_file(sd, str(tmp_path / "h.safetensors"))
    rep = align_checkpoint(tmp_path / "h.safetensors", tmp_path / "a.safetensors", AlignOptions(old_classes=2))
    out = load_file(str(tmp_path / "a.safetensors"))
    assert all(v.dtype == torch.float16 for v in out.values())
    torch.testing.assert_close(out["2.weight"][2:], (HEAD[2:] * rep.groups[1].gamma).half())


# ----- the classifier each family finds ---------------------------------------------------------
def test_bert_classifier_is_the_task_head_never_the_pooler_or_the_mlm_transform(tmp_path):
    """transformers names the classification head (``model.classifier``, [num_labels, hidden]); the pooler
    and the masked-LM transform are hidden -> hidden layers that feed further layers, not class scores."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=6)
    torch.manual_seed(0)
    cls = BertForSequenceClassification(cfg)
    cls.save_pretrained(tmp_path / "cls")
    rep = align_checkpoint(tmp_path / "cls", None, AlignOptions(old_classes=3, clamp=False))
    assert rep.layer == "classifier.weight" and rep.bias_name == "classifier.bias"
    assert len(rep.norms_before) == cls.classifier.out_features == 6
    for name, model in (("base", BertModel(cfg)), ("mlm", BertForMaskedLM(cfg))):
        model.save_pretrained(tmp_path / name)
        with pytest.raises(SurgeryError, match="no Linear classifier found.*--layer"):
            align_checkpoint(tmp_path / name, tmp_path / f"{name}-out", AlignOptions(old_classes=3))
        assert not (tmp_path / f"{name}-out").exists()


def test_eval_refused_in_one_line_when_the_built_model_gives_no_class_scores(tmp_path):
    """The BERT module built here returns hidden states (the task head is not part of it): --eval cannot
    score the classifier, so it is refused before any work instead of failing inside the evaluation."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=6)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, 50, (12, 8), generator=g),
               "labels": torch.randint(0, 6, (12,), generator=g)}, str(tmp_path / "eval.safetensors"))
    options = AlignOptions(old_classes=3, clamp=False, eval_data=tmp_path / "eval.safetensors")
    with pytest.raises(SurgeryError) as e:
        align_checkpoint(tmp_path / "cls", tmp_path / "out", options)
    msg = str(e.value)
    assert "\n" not in msg and "--eval" in msg and "classifier.weight" in msg, msg
    assert not (tmp_path / "out").exists()


def test_single_file_output_does_not_claim_the_files_of_its_input_folder(tmp_path):
    """A folder output lists its files in its metadata so --force can tell it from a user's folder; a single
    file written from such a folder must not carry that list, or a user's folder holding the file and files
    of those names would be taken for ours and replaced."""
    src = tmp_path / "src"
    src.mkdir()
    save_mlp(src / "model.safetensors")
    (src / "notes.txt").write_text("carried")
    align_checkpoint(src, tmp_path / "ours", AlignOptions(old_classes=2))
    align_checkpoint(tmp_path / "ours", tmp_path / "single.safetensors", AlignOptions(old_classes=2))
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "model.safetensors").write_bytes((tmp_path / "single.safetensors").read_bytes())
    (proj / "notes.txt").write_text("my own notes")
    with pytest.raises(SurgeryError, match="did not write"):
        align_checkpoint(src, proj, AlignOptions(old_classes=2, force=True))
    assert (proj / "notes.txt").read_text() == "my own notes"


def test_named_gpt2_conv1d_layer_aligns_its_output_units(tmp_path):
    """GPT-2's Conv1D stores its weight (in, out): the rows to align are its outputs (transformers' ``nf``),
    the columns of the stored tensor, as the family describes the layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "gpt2")
    conv = model.transformer.h[0].mlp.c_proj  # 64 -> 16
    rep = align_checkpoint(tmp_path / "gpt2", tmp_path / "out", AlignOptions(
        layer="transformer.h.0.mlp.c_proj", old_classes=6, clamp=False, norm=2))
    assert len(rep.norms_before) == conv.nf == 16 and rep.bias_name == "transformer.h.0.mlp.c_proj.bias"
    rows = conv.weight.detach().double().t()  # [out, in]
    norms = rows.norm(dim=1)
    gamma = (norms[:6].mean() / norms[6:].mean()).item()
    want = rows.clone()
    want[6:] *= gamma
    bias = conv.bias.detach().double().clone()
    bias[6:] *= gamma
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(out["transformer.h.0.mlp.c_proj.weight"].double(), want.t(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["transformer.h.0.mlp.c_proj.bias"].double(), bias, atol=1e-6, rtol=1e-6)


def test_custom_model_default_classifier_is_its_last_linear(tmp_path, monkeypatch):
    """--model: the default classifier is the module's last nn.Linear (README: 'default: the model's last
    Linear'), found in the factory's module; gamma by hand (L1 row norms, no cap)."""
    from tests.custom_models import TinyConvNet

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # --model imports from the current folder
    torch.manual_seed(0)
    sd = TinyConvNet().state_dict()
    save_file(sd, str(tmp_path / "c.safetensors"))
    rep = align_checkpoint(tmp_path / "c.safetensors", tmp_path / "a.safetensors",
                           AlignOptions(old_classes=6, model="tests.custom_models:tiny_convnet", clamp=False))
    w = sd["head.1.weight"]
    norms = w.abs().sum(1)
    gamma = norms[:6].mean() / norms[6:].mean()
    out = load_file(str(tmp_path / "a.safetensors"))
    torch.testing.assert_close(out["head.1.weight"], torch.cat([w[:6], w[6:] * gamma]))
    torch.testing.assert_close(out["head.1.bias"], torch.cat([sd["head.1.bias"][:6], sd["head.1.bias"][6:] * gamma]))
    assert rep.groups[1].gamma == pytest.approx(float(gamma))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("norm", [1, 2])
def test_slices_of_rows_give_the_whole_matrix_bits(monkeypatch, dtype, transposed, norm):
    """Norms and scaling a few rows at a time (slices of 3 rows here) against the formula on the whole matrix
    widened to float64 at once: the same weight, bias and per-class norms, bit for bit."""
    import modelsurgery.ops.align as align

    monkeypatch.setattr(align, "CHUNK_ELEMENTS", 3 * 37)
    g = torch.Generator().manual_seed(norm + 2 * transposed)
    rows = torch.randn(50, 37, generator=g)
    rows[20:35] *= 1.7
    rows[35:] *= 1.3
    rows = rows.to(dtype)
    bias = torch.randn(50, generator=g).to(dtype)
    groups = [(0, 20), (20, 35), (35, 50)]
    stored = rows.t().contiguous() if transposed else rows
    got = align.align_rows(stored, bias, groups, norm=norm, transposed=transposed)

    view = stored.t() if transposed else stored  # as the layer stores it: a transposed view's norms are strided
    whole = view.double().norm(p=norm, dim=1)
    want, want_bias = view.clone(), bias.clone()
    ref = whole[0:20].mean().item()
    for a, b in groups[1:]:
        gamma = min(ref / whole[a:b].mean().item(), 1.0)
        want[a:b] = (view[a:b].double() * gamma).to(dtype)
        want_bias[a:b] = (bias[a:b].double() * gamma).to(dtype)
    want_after = want.double().norm(p=norm, dim=1)
    assert all(grp.gamma < 1 for grp in got.groups[1:])
    assert torch.equal(got.weight, want.t().contiguous() if transposed else want)
    assert torch.equal(got.bias, want_bias)
    assert torch.equal(got.norms_before, whole) and torch.equal(got.norms_after, want_after)
    assert [grp.mean_norm_after for grp in got.groups[1:]] == [want_after[a:b].mean().item() for a, b in groups[1:]]
