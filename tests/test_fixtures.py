"""The bundled fixtures: present, small, readable, detected as the right family, and as good as
fixtures/README.md says, measured by our evaluate and checked against independent references
(scikit-learn's accuracy_score, transformers' own LM loss)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.data import load_data
from modelsurgery.families import detect_family, registered
from modelsurgery.ops.evaluate import evaluate

CHECKPOINTS = {
    **{f"digits/mlp_seed{s}.safetensors": "mlp" for s in (0, 1, 2)},
    **{f"digits/cnn_seed{s}.safetensors": "cnn" for s in (0, 1, 2)},
    **{f"digits/resnet_seed{s}.safetensors": "resnet" for s in (0, 1)},
    "charlm/gpt2": "gpt2",
    "charlm/llama": "llama",
}
DATA = ["digits_train.safetensors", "digits_eval.safetensors", "digits_calib.safetensors",
        "charlm_train.safetensors", "charlm_eval.safetensors", "charlm_calib.txt"]
CLASSIFIERS = [k for k in CHECKPOINTS if k.startswith("digits/")]


def documented(fixtures_dir) -> dict[str, dict[str, float]]:
    """The metrics table of fixtures/README.md: {file: {metric: value}}."""
    text = (fixtures_dir / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| ((?:\w+ [\d.]+(?:, )?)+) \|$", text, re.MULTILINE)
    return {name: {m: float(v) for m, v in re.findall(r"(\w+) ([\d.]+)", cells)} for name, cells in rows}


def family_or_skip(ckpt: Checkpoint, expected: str):
    if expected not in registered():
        pytest.skip(f"modelsurgery/families/{expected}.py is not written yet")
    return detect_family(ckpt)


def test_files_exist_and_are_small(fixtures_dir):
    for name in [*CHECKPOINTS, *(f"data/{d}" for d in DATA), "README.md", "make_fixtures.py"]:
        assert (fixtures_dir / name).exists(), name
    for folder in ("charlm/gpt2", "charlm/llama"):
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (fixtures_dir / folder / f).is_file(), f"{folder}/{f}"
    total = sum(p.stat().st_size for p in fixtures_dir.rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"fixtures take {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoint_opens_and_is_detected(fixtures_dir, name):
    ckpt = Checkpoint.open(fixtures_dir / name)
    assert ckpt.keys() and ckpt.dtype() == torch.float32
    family = family_or_skip(ckpt, CHECKPOINTS[name])
    assert family.name == CHECKPOINTS[name]


def test_cnn_and_resnet_metadata(fixtures_dir):
    cnn = Checkpoint.open(fixtures_dir / "digits/cnn_seed0.safetensors")
    arch = json.loads(cnn.metadata["modelsurgery.arch"])
    indices = {int(k.split(".")[0]) for k in cnn.keys()}  # noqa: SIM118 - Checkpoint is not iterable
    assert len(arch) == max(indices) + 1
    assert {arch[i] for i in indices} == {"conv", "bn", "linear"}
    for name in ("cnn_seed0", "resnet_seed0"):
        meta = Checkpoint.open(fixtures_dir / f"digits/{name}.safetensors").metadata
        assert json.loads(meta["modelsurgery.input_shape"]) == [1, 8, 8]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_digits_classifier_accuracy(fixtures_dir, name):
    from sklearn.metrics import accuracy_score

    family = family_or_skip(Checkpoint.open(fixtures_dir / name), CHECKPOINTS[name])
    module = family.build_module()
    data = load_data(fixtures_dir / "data/digits_eval.safetensors")
    result = evaluate(module, family, data, batch_size=128)
    with torch.no_grad():
        logits = module(**data.model_inputs(family))
    assert result["accuracy"] == pytest.approx(accuracy_score(data.labels.numpy(), logits.argmax(1).numpy()))
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-5)
    assert result["accuracy"] >= 0.95
    doc = documented(fixtures_dir)[name]
    assert result["accuracy"] == pytest.approx(doc["eval_accuracy"], abs=6e-5)
    assert result["loss"] == pytest.approx(doc["eval_loss"], abs=6e-5)


@pytest.mark.parametrize("name", ["charlm/gpt2", "charlm/llama"])
def test_charlm_is_better_than_unigram(fixtures_dir, name):
    from transformers import AutoModelForCausalLM

    family = family_or_skip(Checkpoint.open(fixtures_dir / name), CHECKPOINTS[name])
    data = load_data(fixtures_dir / "data/charlm_eval.safetensors")
    result = evaluate(family.build_module(), family, data, batch_size=64)
    ref_model = AutoModelForCausalLM.from_pretrained(fixtures_dir / name, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(input_ids=data.input_ids, labels=data.input_ids).loss.item()
    assert result["loss"] == pytest.approx(ref, rel=1e-4)
    train = load_data(fixtures_dir / "data/charlm_train.safetensors").input_ids.flatten()
    p = torch.bincount(train).double() / len(train)
    unigram = -(p[p > 0] * p[p > 0].log()).sum().item()
    assert result["loss"] < unigram - 0.5
    assert result["perplexity"] < family.vocab_size
    assert result["loss"] == pytest.approx(documented(fixtures_dir)[f"{name}/"]["eval_loss"], abs=6e-5)


def test_tokenizer_loads_in_transformers(fixtures_dir):
    from transformers import PreTrainedTokenizerFast

    for name in ("charlm/gpt2", "charlm/llama"):
        tok = PreTrainedTokenizerFast(tokenizer_file=str(fixtures_dir / name / "tokenizer.json"))
        config = json.loads((fixtures_dir / name / "config.json").read_text())
        assert len(tok) == config["vocab_size"] == 99
        text = "def f(x):\n\treturn x ~ 1"
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text) and tok.decode(ids) == text
        assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]"]) == [0, 1]
        assert tok("é")["input_ids"] == [1]


def test_data_files(fixtures_dir):
    split = {s: load_data(fixtures_dir / f"data/digits_{s}.safetensors") for s in ("train", "eval", "calib")}
    assert len(split["train"]) + len(split["eval"]) == 1797
    for d in split.values():
        assert d.inputs.shape[1:] == (64,) and d.inputs.dtype == torch.float32 and d.labels.dtype == torch.int64
        assert d.inputs.min() >= 0 and d.inputs.max() <= 1
    share = torch.bincount(split["eval"].labels, minlength=10) / torch.bincount(
        torch.cat([split["train"].labels, split["eval"].labels]), minlength=10)
    assert torch.all((share - 1 / 3).abs() < 0.01), share  # stratified
    train_rows = {tuple(r.tolist()) for r in split["train"].inputs}
    assert all(tuple(r.tolist()) in train_rows for r in split["calib"].inputs)

    lm = {s: load_data(fixtures_dir / f"data/charlm_{s}.safetensors") for s in ("train", "eval")}
    for d in lm.values():
        assert d.input_ids.shape[1] == 64 and d.input_ids.min() >= 0 and d.input_ids.max() < 99
    train_rows = {tuple(r.tolist()) for r in lm["train"].input_ids}
    assert not any(tuple(r.tolist()) in train_rows for r in lm["eval"].input_ids)
    calib = load_data(fixtures_dir / "data/charlm_calib.txt", tokenizer=fixtures_dir / "charlm/gpt2")
    assert len(calib) == 128 and calib.input_ids.shape[1] <= 64


def test_perplexity_is_exp_loss(fixtures_dir):
    """The documented perplexity is exp of the documented loss (both written by the generator)."""
    for name in ("charlm/gpt2/", "charlm/llama/"):
        doc = documented(fixtures_dir)[name]
        assert doc["eval_perplexity"] == pytest.approx(math.exp(doc["eval_loss"]), abs=2e-3)


@pytest.mark.slow
def test_generator_is_deterministic(tmp_path, fixtures_dir):
    """Two runs of make_fixtures.py give byte-identical files (about 2 x 2 CPU-minutes)."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        subprocess.run([sys.executable, str(fixtures_dir / "make_fixtures.py"), "--out", str(out)],
                       check=True, capture_output=True, timeout=1800)
    files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*") if p.is_file())
    assert len(files) >= 20
    for rel in files:
        assert (runs[0] / rel).read_bytes() == (runs[1] / rel).read_bytes(), rel
