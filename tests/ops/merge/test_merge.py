"""Merging real fixture checkpoints: 2 and 3 models, layout kept, provenance, bad input."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.data import load_data
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.evaluate import evaluate
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.spec import apply_permutation
from modelsurgery.ops.merge.merge import MergeOptions, merge_checkpoints
from tests.ops.match.perms import random_perms


def mlp(fixtures_dir, i):
    return fixtures_dir / "digits" / f"mlp_seed{i}.safetensors"


def accuracy(path, data_path):
    ckpt = Checkpoint.open(path)
    family = detect_family(ckpt)
    return evaluate(family.build_module(), family, load_data(data_path))["accuracy"]


def test_two_model_match_beats_naive_and_keeps_layout(fixtures_dir, tmp_path):
    data = fixtures_dir / "data" / "digits_eval.safetensors"
    out = tmp_path / "m.safetensors"
    r = merge_checkpoints([mlp(fixtures_dir, 0), mlp(fixtures_dir, 1)], out,
                          MergeOptions(eval_data=data, points=3))
    ev = r.evaluation
    ends = [e["accuracy"] for e in ev["endpoints"]]
    assert ev["matched"][1]["accuracy"] > ev["naive"][1]["accuracy"] + 0.05
    assert ev["matched"][1]["accuracy"] > sum(ends) / 2 - 0.02
    assert ev["matched_barrier"] < ev["naive_barrier"]
    # the written file is the matched midpoint, with the inputs' names, order and dtypes
    src = Checkpoint.open(mlp(fixtures_dir, 0))
    got = Checkpoint.open(out)
    names = src.keys()
    assert got.keys() == names
    assert all(got.info(k).dtype == src.info(k).dtype and got.shape(k) == src.shape(k) for k in names)
    assert accuracy(out, data) == pytest.approx(ev["matched"][1]["accuracy"])
    prov = json.loads(got.metadata["modelsurgery"])
    assert prov["operation"] == "merge" and prov["parameters"]["method"] == "match"
    assert len(prov["sources"]) == 2


def test_merged_tensors_are_the_average_of_aligned_models(fixtures_dir, tmp_path):
    # B is A with hidden units shuffled: matching must undo it, so the merge returns A itself
    a = Checkpoint.open(mlp(fixtures_dir, 0))
    spec = permutation_spec(detect_family(a))
    b_path = tmp_path / "b.safetensors"
    save_file(apply_permutation(a.state_dict(), spec, random_perms(spec, torch.Generator().manual_seed(3))),
              str(b_path))
    out = tmp_path / "m.safetensors"
    merge_checkpoints([mlp(fixtures_dir, 0), b_path], out, MergeOptions(alpha=0.3))
    got = Checkpoint.open(out)
    names = a.keys()
    for k in names:
        torch.testing.assert_close(got.get(k), a.get(k))
    naive = tmp_path / "n.safetensors"
    merge_checkpoints([mlp(fixtures_dir, 0), b_path], naive, MergeOptions(method="linear", alpha=0.3))
    k = a.keys()[0]
    torch.testing.assert_close(Checkpoint.open(naive).get(k), 0.7 * a.get(k) + 0.3 * Checkpoint.open(b_path).get(k))


def test_three_model_merge(fixtures_dir, tmp_path):
    data = fixtures_dir / "data" / "digits_eval.safetensors"
    paths = [mlp(fixtures_dir, i) for i in range(3)]
    matched = merge_checkpoints(paths, tmp_path / "m.safetensors", MergeOptions(eval_data=data))
    naive = merge_checkpoints(paths, tmp_path / "n.safetensors", MergeOptions(method="linear", eval_data=data))
    assert len(matched.matching) == 2
    assert matched.evaluation["merged"]["accuracy"] > naive.evaluation["merged"]["accuracy"] + 0.05
    assert matched.evaluation["merged"]["accuracy"] > 0.9


def test_half_precision_kept(fixtures_dir, tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"h{i}.safetensors"
        save_file({k: v.half() for k, v in Checkpoint.open(mlp(fixtures_dir, i)).state_dict().items()}, str(p))
        paths.append(p)
    out = tmp_path / "m.safetensors"
    merge_checkpoints(paths, out, MergeOptions())
    with safe_open(str(out), "pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.float16}


def test_batchnorm_reset_repairs_cnn(fixtures_dir, tmp_path):
    data = fixtures_dir / "data" / "digits_eval.safetensors"
    paths = [fixtures_dir / "digits" / f"cnn_seed{i}.safetensors" for i in range(2)]
    plain = merge_checkpoints(paths, tmp_path / "a.safetensors", MergeOptions(eval_data=data, points=1))
    fixed = merge_checkpoints(paths, tmp_path / "b.safetensors", MergeOptions(eval_data=data, points=1, repair=True))
    assert fixed.evaluation["merged"]["accuracy"] > plain.evaluation["merged"]["accuracy"] + 0.05
    assert accuracy(tmp_path / "b.safetensors", data) == pytest.approx(fixed.evaluation["merged"]["accuracy"])


def test_task_arithmetic_with_base_records_its_parameters(fixtures_dir, tmp_path):
    paths = [mlp(fixtures_dir, 1), mlp(fixtures_dir, 2)]
    out = tmp_path / "t.safetensors"
    result = merge_checkpoints(paths, out, MergeOptions(method="task-arithmetic", base=mlp(fixtures_dir, 0),
                                                        params={"scale": 0.5}))
    a, b, c = (Checkpoint.open(p) for p in (mlp(fixtures_dir, 0), *paths))
    k = "0.weight"
    want = a.get(k) + 0.5 * ((b.get(k) - a.get(k)) + (c.get(k) - a.get(k)))
    torch.testing.assert_close(Checkpoint.open(out).get(k), want)
    assert result.params == {"scale": 0.5}
    assert json.loads(Checkpoint.open(out).metadata["modelsurgery"])["parameters"]["scale"] == 0.5


def test_ties_provenance_records_declared_defaults(fixtures_dir, tmp_path):
    out = tmp_path / "t.safetensors"
    merge_checkpoints([mlp(fixtures_dir, 1), mlp(fixtures_dir, 2)], out,
                      MergeOptions(method="ties", base=mlp(fixtures_dir, 0)))
    params = json.loads(Checkpoint.open(out).metadata["modelsurgery"])["parameters"]
    assert (params["density"], params["scale"]) == (0.2, 1.0)  # TIES paper: top-20%, lambda = 1


@pytest.mark.parametrize("method,params,message", [
    ("linear", {"density": 0.5}, "merge method 'linear' has no parameter 'density'"),
    ("slerp", {"t": 1.5}, "parameter 't' = 1.5: expected a value in"),
    # match averages with linear's declaration, but the user chose match: the message names it
    ("match", {"density": 0.5}, "merge method 'match' has no parameter 'density'"),
])
def test_undeclared_or_bad_parameter_refused(fixtures_dir, tmp_path, method, params, message):
    out = tmp_path / "m.safetensors"
    with pytest.raises(SurgeryError, match=message):
        merge_checkpoints([mlp(fixtures_dir, 1), mlp(fixtures_dir, 2)], out, MergeOptions(method=method, params=params))
    assert not out.exists()


def _bad(tmp_path, tensors):
    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p))
    return p


@pytest.mark.parametrize("case,message", [
    ("architecture", "tensor '0.weight' has shape"),
    ("shape", "tensor '2.weight' has shape"),
    ("missing", "tensor '4.bias'"),
    ("base", "needs --base"),
    ("alpha3", "--alpha needs exactly two models"),
])
def test_bad_input_names_the_tensor_and_writes_nothing(fixtures_dir, tmp_path, case, message):
    a = Checkpoint.open(mlp(fixtures_dir, 0)).state_dict()
    options = MergeOptions()
    paths = [mlp(fixtures_dir, 0)]
    if case == "architecture":
        paths.append(fixtures_dir / "digits" / "cnn_seed0.safetensors")
    elif case == "shape":
        paths.append(_bad(tmp_path, {**a, "2.weight": torch.zeros(128, 64)}))
    elif case == "missing":
        paths.append(_bad(tmp_path, {k: v for k, v in a.items() if k != "4.bias"}))
    elif case == "base":
        paths.append(mlp(fixtures_dir, 1))
        options = MergeOptions(method="ties")
    else:
        paths += [mlp(fixtures_dir, 1), mlp(fixtures_dir, 2)]
        options = MergeOptions(alpha=0.5)
    out = tmp_path / "out.safetensors"
    before = set(tmp_path.iterdir())
    with pytest.raises(SurgeryError, match=message):
        merge_checkpoints(paths, out, options)
    assert set(tmp_path.iterdir()) == before


def test_not_permutable_model(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"x{i}.safetensors")
        save_file({"x": torch.randn(2, 3, 4)}, str(paths[-1]))
    out = tmp_path / "o.safetensors"
    with pytest.raises(SurgeryError, match="not permutable"):
        merge_checkpoints(paths, out, MergeOptions())
    assert not out.exists()
    merge_checkpoints(paths, out, MergeOptions(method="linear"))  # a plain average still works
    assert out.exists()


def test_existing_output_refused(fixtures_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(SurgeryError, match="already exists"):
        merge_checkpoints([mlp(fixtures_dir, 0), mlp(fixtures_dir, 1)], out, MergeOptions())
    assert out.read_bytes() == b"keep"




@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformer_folder_merge_undoes_a_shuffle(tmp_path, name):
    from tests.hf_tiny import save_tiny_gpt2, save_tiny_llama

    src = (save_tiny_gpt2 if name == "gpt2" else save_tiny_llama)(tmp_path / "a")
    ckpt = Checkpoint.open(src)
    spec = permutation_spec(detect_family(ckpt))
    shuffled = tmp_path / "b"
    shuffled.mkdir()
    (shuffled / "config.json").write_text((src / "config.json").read_text())
    state = apply_permutation(ckpt.state_dict(), spec, random_perms(spec, torch.Generator().manual_seed(1)))
    save_file({k: v.contiguous() for k, v in state.items()}, str(shuffled / "model.safetensors"))
    out = tmp_path / "merged"
    r = merge_checkpoints([src, shuffled], out, MergeOptions())
    assert r.family == name and (out / "config.json").is_file()
    got = Checkpoint.open(out)
    names = ckpt.keys()
    assert got.keys() == names
    for k in names:
        torch.testing.assert_close(got.get(k), ckpt.get(k))


def test_align_with_base_aligns_into_the_base_basis(fixtures_dir, tmp_path):
    # fine-tuned models stored in shuffled bases: aligned into the base's basis, task arithmetic
    # with identical "fine-tunes" of the base returns the base itself
    base = mlp(fixtures_dir, 0)
    ckpt = Checkpoint.open(base)
    spec = permutation_spec(detect_family(ckpt))
    paths = []
    for seed in (1, 2):
        p = tmp_path / f"ft{seed}.safetensors"
        save_file(apply_permutation(ckpt.state_dict(), spec, random_perms(spec, torch.Generator().manual_seed(seed))),
                  str(p))
        paths.append(p)
    out = tmp_path / "m.safetensors"
    r = merge_checkpoints(paths, out, MergeOptions(method="task-arithmetic", base=base, align=True))
    assert len(r.matching) == 2
    merged = Checkpoint.open(out)
    names = ckpt.keys()
    for k in names:
        torch.testing.assert_close(merged.get(k), ckpt.get(k))
