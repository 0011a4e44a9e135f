"""Property-based round trips: random names, shapes (scalars and empty dims included), dtypes and
shard sizes survive write -> read bit for bit, by our reader and by the reference one."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from modelsurgery.checkpoint import Checkpoint, plan_tensor, write_checkpoint
from tests.checkpoint.helpers import assert_same_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]

names = st.text(alphabet="abcxyz0123456789._-", min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def tensors(draw):
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    n = 1
    for d in shape:
        n *= d
    raw = draw(st.binary(min_size=n * torch.empty((), dtype=dtype).element_size(),
                         max_size=n * torch.empty((), dtype=dtype).element_size()))
    if dtype == torch.bool:  # only 0/1 bytes are valid booleans
        raw = bytes(b & 1 for b in raw)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).clone()  # arbitrary bit patterns: NaN payloads, subnormals


states = st.dictionaries(names, tensors(), min_size=1, max_size=8)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(state=states, metadata=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=3))
def test_safetensors_round_trip(state, metadata):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "x.safetensors"
        write_checkpoint(out, [plan_tensor(k, v) for k, v in state.items()], metadata=metadata)
        ckpt = Checkpoint.open(out)
        assert ckpt.keys() == list(state)  # order kept
        assert_same_tensors(ckpt.state_dict(), state)
        assert_same_tensors(load_file(out), state)
        assert {k: ckpt.metadata[k] for k in metadata} == metadata


@SETTINGS
@given(state=states, max_shard=st.integers(1, 400))
def test_sharded_round_trip(state, max_shard):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "folder"
        write_checkpoint(out, [plan_tensor(k, v) for k, v in state.items()], max_shard_size=max_shard)
        assert_same_tensors(Checkpoint.open(out).state_dict(), state)
        index = out / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            for shard in set(weight_map.values()):
                held = load_file(out / shard)
                size = sum(t.numel() * t.element_size() for t in held.values())
                assert size <= max_shard or len(held) == 1  # only a lone oversize tensor may exceed


@SETTINGS
@given(state=states)
def test_torch_pickle_round_trip(state):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "x.pt"
        torch.save({"state_dict": state, "epoch": 1}, out)
        assert_same_tensors(Checkpoint.open(out).state_dict(), state)
