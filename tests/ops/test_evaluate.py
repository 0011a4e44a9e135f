"""evaluate / compare_outputs against hand computations (cross_entropy, counting, cosine) and
against transformers' own causal-LM loss on padded batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.data import Dataset
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.evaluate import compare_outputs, evaluate
from tests.hf_tiny import load_hf, save_tiny_bert, save_tiny_gpt2, save_tiny_llama


def tiny_mlp(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    state = {"0.weight": torch.randn(8, 5, generator=g), "0.bias": torch.randn(8, generator=g),
             "2.weight": torch.randn(4, 8, generator=g), "2.bias": torch.randn(4, generator=g)}
    family = detect_family(Checkpoint.from_state_dict(state))
    return family, family.build_module()


def by_hand(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.relu(x @ state["0.weight"].T + state["0.bias"]) @ state["2.weight"].T + state["2.bias"]


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_classifier_loss_and_accuracy_by_hand(batch_size):
    family, module = tiny_mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 5, generator=g), torch.randint(0, 4, (23,), generator=g)
    logits = by_hand(family.ckpt.state_dict(), x)
    result = evaluate(module, family, Dataset("mem", inputs=x, labels=y), batch_size=batch_size)
    assert result["samples"] == 23
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    correct = sum(int(logits[i].argmax()) == int(y[i]) for i in range(23))
    assert result["accuracy"] == correct / 23


def test_lm_loss_matches_transformers_with_padding(tmp_path):
    folder = save_tiny_llama(tmp_path / "llama")
    family = detect_family(Checkpoint.open(folder))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (5, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 3:] = 0
    result = evaluate(family.build_module(), family, Dataset("mem", input_ids=ids, attention_mask=mask), batch_size=2)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = load_hf(folder)(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert result["tokens"] == int(mask[:, 1:].sum())
    assert result["loss"] == pytest.approx(ref, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_lm_labels_with_ignore_index(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "gpt2")
    family = detect_family(Checkpoint.open(folder))
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :6] = -100  # score only the last positions, as a prompt/answer split would
    result = evaluate(family.build_module(), family, Dataset("mem", input_ids=ids, labels=labels))
    with torch.no_grad():
        ref = load_hf(folder)(input_ids=ids, labels=labels).loss.item()
    assert result["tokens"] == 3 * 4
    assert result["loss"] == pytest.approx(ref, rel=1e-5)


def test_encoder_has_nothing_to_score_alone(tmp_path):
    family = detect_family(Checkpoint.open(save_tiny_bert(tmp_path / "bert")))
    data = Dataset("mem", input_ids=torch.randint(0, 97, (2, 6)))
    assert evaluate(family.build_module(), family, data) == {"samples": 2}


def test_bad_labels_and_missing_labels():
    family, module = tiny_mlp()
    with pytest.raises(SurgeryError, match="mem: label 4 is outside the model's 4 outputs"):
        evaluate(module, family, Dataset("mem", inputs=torch.randn(3, 5), labels=torch.tensor([0, 4, 1])))
    with pytest.raises(SurgeryError, match="mem: has no 'labels'; evaluating a classifier needs them"):
        evaluate(module, family, Dataset("mem", inputs=torch.randn(3, 5)))
    with pytest.raises(SurgeryError, match=r"mem: samples of shape \[6\]"):
        evaluate(module, family, Dataset("mem", inputs=torch.randn(3, 6), labels=torch.zeros(3, dtype=torch.long)))


def test_training_flag_is_restored():
    family, module = tiny_mlp()
    module.train()
    evaluate(module, family, Dataset("mem", inputs=torch.randn(3, 5), labels=torch.zeros(3, dtype=torch.long)))
    assert module.training


def test_compare_outputs_by_hand():
    family, a = tiny_mlp(0)
    other = detect_family(Checkpoint.from_state_dict({k: v + 0.05 * torch.randn_like(v)
                                                      for k, v in family.ckpt.state_dict().items()}))
    b = other.build_module()
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    la, lb = by_hand(family.ckpt.state_dict(), x), by_hand(other.ckpt.state_dict(), x)
    result = compare_outputs(a, b, family, Dataset("mem", inputs=x), batch_size=4)
    cos = F.cosine_similarity(la, lb, dim=1)
    assert result["vectors"] == 9
    assert result["cosine_mean"] == pytest.approx(cos.mean().item(), abs=1e-6)
    assert result["cosine_min"] == pytest.approx(cos.min().item(), abs=1e-6)
    assert result["max_abs_diff"] == pytest.approx((la - lb).abs().max().item(), abs=1e-5)
    assert result["top1_agreement"] == pytest.approx((la.argmax(1) == lb.argmax(1)).double().mean().item())
    same = compare_outputs(a, a, family, Dataset("mem", inputs=x))
    assert same["max_abs_diff"] == 0.0 and same["cosine_min"] == pytest.approx(1.0)


def test_compare_outputs_skips_padding(tmp_path):
    family = detect_family(Checkpoint.open(save_tiny_gpt2(tmp_path / "gpt2")))
    module = family.build_module()
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    result = compare_outputs(module, module, family, Dataset("mem", input_ids=ids, attention_mask=mask))
    assert result["vectors"] == 13 and result["max_abs_diff"] == 0.0
