"""Packing: byte layouts by hand, round trips for every bit width, dequantization of the packed format."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.packing import (
    METADATA_KEY,
    PackedWeight,
    dequantize_checkpoint,
    pack_codes,
    read_packed,
    scheme_metadata,
    unpack_codes,
)


def test_layouts_by_hand():
    # 4 bits: element 2j in the low nibble of byte j, 2j+1 in the high nibble
    assert pack_codes(torch.tensor([[1, 2, 3, 15, 0]]), 4).tolist() == [[0x21, 0xF3, 0x00]]
    # 3 bits, LSB-first bit stream: 5 = bits 1,0,1 then 3 = bits 1,1,0 -> 1 + 4 + 8 + 16
    assert pack_codes(torch.tensor([[5, 3]]), 3).tolist() == [[29]]
    # 2 bits: 1 | 2 << 2 | 3 << 4 | 0 << 6
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[57]]
    # 8 bits: one code per byte
    assert pack_codes(torch.tensor([[0, 255, 7]]), 8).tolist() == [[0, 255, 7]]


def reference_unpack(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """A plain-Python reader of the documented bit stream (independent of the code under test)."""
    out = np.zeros((packed.shape[0], length), dtype=np.int64)
    for r, row in enumerate(packed):
        for i in range(length):
            v = 0
            for b in range(bits):
                pos = i * bits + b
                v |= ((int(row[pos // 8]) >> (pos % 8)) & 1) << b
            out[r, i] = v
    return out


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), length=st.integers(1, 37), data=st.data())
def test_round_trip_every_bit_width(bits, rows, length, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=rows * length, max_size=rows * length))
    q = torch.tensor(values, dtype=torch.int64).reshape(rows, length)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-length * bits // 8))
    assert np.array_equal(unpack_codes(packed, bits, length), q.numpy())
    assert np.array_equal(reference_unpack(packed.numpy(), bits, length), q.numpy())


def test_codes_out_of_range_rejected():
    with pytest.raises(SurgeryError, match="out of range for 3 bits"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(SurgeryError, match="bit width 9"):
        pack_codes(torch.tensor([[1]]), 9)
    with pytest.raises(SurgeryError, match="bit width 0"):
        pack_codes(torch.tensor([[0]]), 0)


def _write(path, tensors: dict, layers: dict, fmt: str = "packed") -> Checkpoint:
    save_file(tensors, path, metadata=scheme_metadata(fmt, "rtn", {"bits": 4}, layers))
    return Checkpoint.open(path)


def test_dequantize_packed_by_hand(tmp_path):
    # a 2x4 weight, groups of 2, 4 bits: W = (q - z) * s
    q = torch.tensor([[0, 15, 8, 9], [3, 4, 5, 6]])
    scale = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    zero = torch.tensor([[8, 8], [0, 4]], dtype=torch.uint8)
    tensors = {"w.qweight": pack_codes(q, 4), "w.scale": scale, "w.zero_point": zero, "b": torch.ones(2)}
    d = dequantize_checkpoint(_write(tmp_path / "a.safetensors", tensors,
                                     {"w": {"shape": [2, 4], "bits": 4, "group_size": 2}}))
    assert set(d) == {"w", "b"}
    assert d["w"].tolist() == [[-4.0, 3.5, 0.0, 0.25], [3.0, 4.0, 2.0, 4.0]]
    # the same codes for a Conv1D weight stored (in, out) come back transposed
    dt = dequantize_checkpoint(_write(tmp_path / "t.safetensors", tensors,
                                      {"w": {"shape": [4, 2], "bits": 4, "group_size": 2, "transposed": True}}))
    assert torch.equal(dt["w"], d["w"].t())


def test_one_reader_validates_what_quantize_and_export_read(tmp_path):
    """Quantize's dequantize_checkpoint and the exporter's read_packed are the same validated reader:
    an entry that contradicts its tensors is refused in one line by both."""
    tensors = {"w.qweight": pack_codes(torch.zeros(2, 8, dtype=torch.int64), 4), "w.scale": torch.ones(2, 1),
               "w.zero_point": torch.zeros(2, 1, dtype=torch.uint8)}
    ckpt = _write(tmp_path / "bad.safetensors", tensors, {"w": {"shape": [2, 8], "bits": 3}})
    for read in (dequantize_checkpoint, read_packed):
        with pytest.raises(SurgeryError, match=r"bad.safetensors: tensor 'w.qweight' .* expected uint8 \(2, 3\)"):
            read(ckpt)
    ckpt = _write(tmp_path / "nine.safetensors", tensors, {"w": {"shape": [2, 8], "bits": 9}})
    with pytest.raises(SurgeryError, match="has 9 bits; 1 to 8 are supported"):
        dequantize_checkpoint(ckpt)
    fake = _write(tmp_path / "fake.safetensors", {"w": torch.ones(2, 4)}, {"w": {"shape": [2, 4], "bits": 4}}, "fake")
    assert read_packed(fake) == []  # fake-quantized weights are plain floats
    with pytest.raises(SurgeryError, match=f"not a packed quantized checkpoint .*{METADATA_KEY}"):
        dequantize_checkpoint(fake)


@pytest.mark.parametrize("group_size", ["abc", float("inf"), -2, 2.5, True, [2]])
def test_group_size_of_the_wrong_type_is_one_line(tmp_path, group_size):
    """Issue #14 item 13: packed metadata group_size "abc"/Infinity raised ValueError/OverflowError."""
    q = torch.tensor([[0, 15, 8, 9], [3, 4, 5, 6]])
    tensors = {"w.qweight": pack_codes(q, 4), "w.scale": torch.ones(2, 2),
               "w.zero_point": torch.zeros(2, 2, dtype=torch.uint8)}
    layers = {"w": {"shape": [2, 4], "bits": 4, "group_size": group_size}}
    ckpt = _write(tmp_path / "g.safetensors", tensors, layers)
    with pytest.raises(SurgeryError, match=r"g.safetensors: quantization entry for 'w' has group_size .*expected"):
        dequantize_checkpoint(ckpt)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), length=st.integers(1, 40), group=st.integers(1, 12), transposed=st.booleans(),
       granularity=st.sampled_from(["tensor", "channel", "group"]), seed=st.integers(0, 2**16))
def test_dequantize_every_granularity_against_numpy(rows, length, group, transposed, granularity, seed):
    """(q - z) * s with each column's group found by index (column // group size, a last group cut short):
    numpy in float32, one rounding, so bit for bit."""
    rng = np.random.default_rng(seed)
    groups = {"tensor": 1, "channel": 1, "group": -(-length // group)}[granularity]
    held = 1 if granularity == "tensor" else rows
    codes = rng.integers(0, 16, (rows, length)).astype(np.uint8)
    scale = rng.random((held, groups)).astype(np.float32)
    zero = rng.integers(0, 16, (held, groups)).astype(np.uint8)
    shape = (length, rows) if transposed else (rows, length)
    w = PackedWeight("w", shape, 4, group if granularity == "group" else None, codes, scale, zero, transposed)
    col = np.arange(length) // (group if granularity == "group" else length)
    r = np.arange(rows)[:, None] if held == rows else np.zeros((rows, 1), dtype=int)
    expected = (codes.astype(np.float32) - zero[r, col].astype(np.float32)) * scale[r, col]
    got = w.dequantize(torch.float32).numpy()
    assert np.array_equal(got, expected.T if transposed else expected)
