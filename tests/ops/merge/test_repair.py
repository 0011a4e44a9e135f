"""REPAIR on every family `--repair` accepts (Jordan et al. 2023, Sec. 4): after the correction,
each corrected layer's per-channel output mean and std equal the interpolation of the endpoints'
statistics. The statistics here are computed independently of ops.merge.repair: each layer's full
output is collected and reduced with torch.mean/torch.std over every axis but the channel axis
(dim 1 for convs, the last axis for Linear and GPT-2's Conv1D)."""

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.families.transformer import Conv1D
from modelsurgery.ops.merge.merge import MergeOptions, merge_checkpoints
from modelsurgery.ops.merge.repair import repair
from tests.hf_tiny import save_tiny_gpt2, save_tiny_llama


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Two differently initialised tiny models per architecture, written by transformers."""
    made = {}

    def get(save):
        if save not in made:
            root = tmp_path_factory.mktemp(save.__name__)
            made[save] = (save(root / "a", seed=0), save(root / "b", seed=1))
        return made[save]
    return get


def outputs(module, names, inputs):
    """name -> [N, C] rows of the layer's output, padded tokens dropped."""
    got = {n: [] for n in names}
    hooks = []
    for n in names:
        layer = module.get_submodule(n)
        conv = isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d))
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, n=n, conv=conv: got[n].append(o.movedim(1, -1) if conv else o)))
    with torch.no_grad():
        module(**inputs)
    for h in hooks:
        h.remove()
    mask = inputs.get("attention_mask")
    rows = {}
    for n, parts in got.items():
        x = torch.cat(parts)
        if mask is not None and x.ndim == 3:
            x = x[mask.bool()]
        rows[n] = x.reshape(-1, x.shape[-1]).double()
    return rows


def token_data(tmp_path, seq_len, pad=0):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (8, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[:, -pad:] = 0
        ids[:, -pad:] = 0
    path = tmp_path / "eval.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask}, str(path))
    return path, {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name,save,seq_len,pad", [
    ("gpt2", save_tiny_gpt2, 20, 0),
    ("llama", save_tiny_llama, 32, 0),   # sequence length == width (32): the axes must not be confused
    ("llama", save_tiny_llama, 24, 5),   # padded tokens are left out of the statistics
])
def test_repair_matches_the_interpolated_statistics(tmp_path, pairs, name, save, seq_len, pad):
    a, b = pairs(save)
    family = detect_family(Checkpoint.open(a))
    ends = [family.build_module(Checkpoint.open(p).state_dict()) for p in (a, b)]
    merged = family.build_module({k: (v + Checkpoint.open(b).get(k)) / 2 if v.is_floating_point() else v
                                  for k, v in Checkpoint.open(a).state_dict().items()})
    _, inputs = token_data(tmp_path, seq_len, pad)
    report = repair(merged, ends, [0.5, 0.5], inputs, set(family.head_names()))
    layers = {r["name"]: r for r in report["layers"]}
    assert report["method"] == "repair" and layers
    if name == "gpt2":  # GPT-2's projections are Conv1D (weight stored (in, out))
        assert all(isinstance(merged.get_submodule(n), Conv1D) for n in layers)
        assert {r["correction"] for r in layers.values()} == {"affine"}
    else:  # LLaMA's projections have no bias: rescaling only
        assert {r["correction"] for r in layers.values()} == {"scale"}
    names = list(layers)
    want = [outputs(e, names, inputs) for e in ends]
    got = outputs(merged, names, inputs)
    for n in names:
        target_std = 0.5 * (want[0][n].std(0) + want[1][n].std(0))
        torch.testing.assert_close(got[n].std(0), target_std, rtol=1e-3, atol=1e-5)
        assert got[n].shape[1] == layers[n]["channels"]
        if layers[n]["correction"] == "affine":
            target_mean = 0.5 * (want[0][n].mean(0) + want[1][n].mean(0))
            torch.testing.assert_close(got[n].mean(0), target_mean, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("save", [save_tiny_gpt2, save_tiny_llama])
def test_merge_repair_on_transformers_reports_each_layer(tmp_path, pairs, save):
    a, b = pairs(save)
    data, _ = token_data(tmp_path, 16)
    r = merge_checkpoints([a, b], tmp_path / "m", MergeOptions(method="linear", eval_data=data, points=1, repair=True))
    rep = r.evaluation["repaired"]
    family = detect_family(Checkpoint.open(a))
    # every block's attention and MLP projections (the tied or separate LM head stays)
    assert rep["method"] == "repair" and len(rep["layers"]) >= 4 * family.num_layers
    # the written output is the repaired model
    out = family.build_module(Checkpoint.open(tmp_path / "m").state_dict())
    from modelsurgery.data import load_data
    from modelsurgery.ops.evaluate import evaluate
    loss = evaluate(out, family, load_data(data), batch_size=256)["loss"]
    assert loss == pytest.approx(r.evaluation["merged"]["loss"])


def test_repair_refuses_a_model_with_no_hidden_layer(tmp_path):
    from torch import nn

    module = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))  # the only layer is the output layer
    with pytest.raises(SurgeryError, match="m.safetensors: --repair found no hidden Linear/Conv/Conv1D layer"):
        repair(module, [module, module], [0.5, 0.5], {"input": torch.randint(0, 11, (4, 3))}, set(), "m.safetensors")


def test_encoder_repair_runs_and_eval_alone_is_refused(tmp_path, pairs):
    """BERT outputs hidden states: --eval has no loss to score (refused in one line, nothing written), while
    --repair uses the data for statistics only; the written model's corrected layers then have the
    interpolated per-channel std (measured here, not by ops.merge.repair)."""
    from tests.hf_tiny import save_tiny_bert

    a, b = pairs(save_tiny_bert)
    data, inputs = token_data(tmp_path, 16)
    with pytest.raises(SurgeryError, match="outputs hidden states, not logits"):
        merge_checkpoints([a, b], tmp_path / "e", MergeOptions(method="linear", eval_data=data))
    assert not (tmp_path / "e").exists()
    r = merge_checkpoints([a, b], tmp_path / "m", MergeOptions(method="linear", eval_data=data, repair=True))
    layers = [x["name"] for x in r.evaluation["repaired"]["layers"]]
    family = detect_family(Checkpoint.open(a))
    assert len(layers) >= 4 * family.num_layers
    ends = [family.build_module(Checkpoint.open(p).state_dict()) for p in (a, b)]
    want = [outputs(e, layers, inputs) for e in ends]
    got = outputs(family.build_module(Checkpoint.open(tmp_path / "m").state_dict()), layers, inputs)
    for n in layers:
        torch.testing.assert_close(got[n].std(0), 0.5 * (want[0][n].std(0) + want[1][n].std(0)), rtol=1e-3, atol=1e-5)
