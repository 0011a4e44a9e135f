"""Provenance metadata and atomic output: digests of the sources, refusal to overwrite, and no
output and no temporary files after a failure in the middle of writing."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from modelsurgery import __version__
from modelsurgery.checkpoint import (
    Checkpoint,
    PlannedTensor,
    Provenance,
    check_output,
    plan_copy,
    plan_tensor,
    write_checkpoint,
)
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.inspect import inspect_checkpoint
from tests.checkpoint.helpers import snapshot


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(32, 32, generator=g) for i in range(4)}


def _write_source(path, seed=0):
    write_checkpoint(path, [plan_tensor(k, v) for k, v in _state(seed).items()])
    return path


def test_provenance_digests_match_sha256_of_sources(tmp_path):
    a, b = _write_source(tmp_path / "a.safetensors", 0), _write_source(tmp_path / "b.safetensors", 1)
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    out = tmp_path / "merged.safetensors"
    prov = Provenance("merge", {"alpha": 0.5, "method": "weight_matching"}, ca.source_files + cb.source_files)
    plans = [plan_tensor(k, (ca.get(k) + cb.get(k)) / 2) for k in ca]
    write_checkpoint(out, plans, provenance=prov)
    with safe_open(str(out), framework="pt") as f:  # the reference reader sees the record
        record = json.loads(f.metadata()["modelsurgery"])
    assert record["tool"] == "modelsurgery" and record["version"] == __version__
    assert record["operation"] == "merge" and record["parameters"] == {"alpha": 0.5, "method": "weight_matching"}
    assert [s["file"] for s in record["sources"]] == [str(a), str(b)]
    for src, entry in zip((a, b), record["sources"]):
        assert entry["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert inspect_checkpoint(out).provenance == record


def test_provenance_lists_every_shard_of_a_sharded_source(tmp_path):
    src = tmp_path / "src"
    write_checkpoint(src, [plan_tensor(k, v) for k, v in _state().items()], max_shard_size=5000)
    ckpt = Checkpoint.open(src)
    assert len(ckpt.source_files) == 4
    out = tmp_path / "out"
    write_checkpoint(out, [plan_copy(ckpt, k) for k in ckpt],
                     provenance=Provenance("copy", {}, ckpt.source_files))
    record = json.loads(Checkpoint.open(out).metadata["modelsurgery"])
    assert {s["file"]: s["sha256"] for s in record["sources"]} == {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(src.glob("model-*.safetensors"))
    }


@pytest.mark.parametrize("name", ["out.safetensors", "out_folder", "out.pt"])
def test_existing_output_refused_without_force_replaced_with_force(tmp_path, name):
    out = tmp_path / name
    write_checkpoint(out, [plan_tensor("x", torch.zeros(3))])
    before = snapshot(tmp_path)
    with pytest.raises(SurgeryError, match="already exists"):
        write_checkpoint(out, [plan_tensor("x", torch.ones(3))])
    with pytest.raises(SurgeryError, match="already exists"):
        check_output(out, force=False)
    assert snapshot(tmp_path) == before
    write_checkpoint(out, [plan_tensor("x", torch.ones(3))], force=True)
    assert torch.equal(Checkpoint.open(out).get("x"), torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no leftovers of the old output


def test_output_equal_to_input_refused(tmp_path):
    src = _write_source(tmp_path / "a.safetensors")
    with pytest.raises(SurgeryError, match="overwrite the input"):
        check_output(src, force=True, inputs=[src])
    with pytest.raises(SurgeryError, match="does not exist"):
        check_output(tmp_path / "missing_dir" / "x.safetensors", force=False)


class Boom(RuntimeError):
    pass


def _failing_plans(n_ok: int, exc: type[BaseException] = Boom):
    plans = [plan_tensor(f"ok.{i}", torch.randn(64, 64)) for i in range(n_ok)]

    def explode():
        raise exc("failed while producing a tensor")

    plans.append(PlannedTensor("bad", (64, 64), torch.float32, explode))
    plans.append(plan_tensor("after", torch.randn(4)))
    return plans


@pytest.mark.parametrize("name,shard", [("out.safetensors", None), ("out_folder", None), ("out_folder", 20000),
                                        ("out.pt", None)])
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failure_mid_write_leaves_no_output_and_no_temp_files(tmp_path, name, shard, exc):
    before = snapshot(tmp_path)
    kwargs = {"max_shard_size": shard} if shard else {}
    with pytest.raises(exc):
        write_checkpoint(tmp_path / name, _failing_plans(6, exc), **kwargs)
    assert snapshot(tmp_path) == before == {}


def test_failure_mid_write_with_force_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    write_checkpoint(out, [plan_tensor("old", torch.arange(5.0))], config={"a": 1})
    before = snapshot(tmp_path)
    with pytest.raises(Boom):
        write_checkpoint(out, _failing_plans(3), force=True, max_shard_size=10000)
    assert snapshot(tmp_path) == before


def test_planned_shape_mismatch_is_a_user_error_and_writes_nothing(tmp_path):
    plans = [PlannedTensor("w", (3, 3), torch.float32, lambda: torch.zeros(3, 4))]
    with pytest.raises(SurgeryError, match="'w'.*planned shape"):
        write_checkpoint(tmp_path / "o.safetensors", plans)
    with pytest.raises(SurgeryError, match="planned twice"):
        write_checkpoint(tmp_path / "o.safetensors", [plan_tensor("w", torch.ones(1))] * 2)
    assert snapshot(tmp_path) == {}
