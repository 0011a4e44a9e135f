"""The packed-format reader against packers written from the contract text (tests/export/packing.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.export.packed import read_packed, unpack_codes
from tests.export.packing import dequantize_reference, pack_rows, pack_rows_numpy, rtn_codes, write_packed


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 8]), rows=st.integers(1, 5), length=st.integers(1, 41),
       seed=st.integers(0, 2**31 - 1))
def test_unpack_inverts_the_contract_bit_stream(bits, rows, length, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, length)).astype(np.uint8)
    assert np.array_equal(unpack_codes(pack_rows(codes, bits), bits, length), codes)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, 4), length=st.integers(1, 33), seed=st.integers(0, 2**31 - 1))
def test_numpy_packer_agrees_with_the_bit_stream(bits, rows, length, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, length)).astype(np.uint8)
    assert np.array_equal(pack_rows_numpy(codes, bits), pack_rows(codes, bits))


def test_four_bit_layout_is_low_nibble_first():
    # element 2j in the low nibble of byte j, 2j+1 in the high nibble (the contract's own example)
    packed = pack_rows(np.array([[1, 2, 3]], np.uint8), 4)
    assert packed.tolist() == [[0x21, 0x03]]
    assert unpack_codes(packed, 4, 3).tolist() == [[1, 2, 3]]


@pytest.mark.parametrize("shape,bits,group", [((6, 20), 4, None), ((6, 20), 4, 8), ((5, 3, 2, 2), 8, None),
                                               ((4, 56), 3, 16), ((7, 9), 8, 4)])
def test_dequantize_matches_the_contract(tmp_path, shape, bits, group):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    path, deq = write_packed({"a.weight": w, "a.bias": torch.zeros(shape[0])}, ["a.weight"],
                             tmp_path / "p.safetensors", bits, group)
    (pw,) = read_packed(Checkpoint.open(path))
    assert pw.shape == shape and pw.bits == bits and pw.group_size == group
    assert torch.equal(pw.dequantize(), deq["a.weight"])
    # and RTN is a sane quantizer: error within half a step
    codes, scale, zero = rtn_codes(w.numpy(), bits, group)
    step = float(scale.max())
    assert float((deq["a.weight"] - w).abs().max()) <= step / 2 + 1e-6
    assert torch.equal(dequantize_reference(codes, scale, zero, shape, group), deq["a.weight"])


def test_per_tensor_scale(tmp_path):
    codes = np.array([[0, 15], [7, 8]], np.uint8)
    meta = {"layers": {"a.weight": {"shape": [2, 2], "bits": 4, "group_size": 0}}}
    save_file({"a.weight.qweight": torch.from_numpy(pack_rows(codes, 4)),
               "a.weight.scale": torch.tensor([[0.5]]), "a.weight.zero_point": torch.tensor([[8]], dtype=torch.uint8)},
              str(tmp_path / "t.safetensors"), metadata={"modelsurgery.quantization": json.dumps(meta)})
    (pw,) = read_packed(Checkpoint.open(tmp_path / "t.safetensors"))
    assert pw.granularity == "tensor"
    assert pw.dequantize().tolist() == [[-4.0, 3.5], [-0.5, 0.0]]


def test_missing_scale_names_the_tensor(tmp_path):
    path, _ = write_packed({"a.weight": torch.randn(4, 8)}, ["a.weight"], tmp_path / "p.safetensors", 4)
    tensors = {k: v for k, v in Checkpoint.open(path).state_dict().items() if not k.endswith(".scale")}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=Checkpoint.open(path).metadata)
    with pytest.raises(SurgeryError, match=r"a\.weight\.scale"):
        read_packed(Checkpoint.open(tmp_path / "bad.safetensors"))


def test_wrong_qweight_shape_names_the_tensor(tmp_path):
    path, _ = write_packed({"a.weight": torch.randn(4, 8)}, ["a.weight"], tmp_path / "p.safetensors", 4)
    meta = json.loads(Checkpoint.open(path).metadata["modelsurgery.quantization"])
    meta["layers"]["a.weight"]["bits"] = 8  # the stored bytes hold 4-bit codes
    tensors = Checkpoint.open(path).state_dict()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"modelsurgery.quantization": json.dumps(meta)})
    with pytest.raises(SurgeryError, match=r"a\.weight\.qweight.*expected uint8 \(4, 8\)"):
        read_packed(Checkpoint.open(tmp_path / "bad.safetensors"))


def test_transposed_entry_rows_are_output_channels(tmp_path):
    w = torch.randn(12, 5, generator=torch.Generator().manual_seed(4))  # stored (in=12, out=5), as GPT-2's Conv1D
    path, deq = write_packed({"c.weight": w}, ["c.weight"], tmp_path / "p.safetensors", 4, 4,
                             transposed=frozenset({"c.weight"}))
    (pw,) = read_packed(Checkpoint.open(path))
    assert pw.transposed and (pw.rows, pw.row_length) == (5, 12) and pw.codes.shape == (5, 12)
    assert pw.dequantize().shape == (12, 5) and torch.equal(pw.dequantize(), deq["c.weight"])
