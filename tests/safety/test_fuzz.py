"""Standing defence (issue #14): fuzzed safetensors headers, shard indexes and config.json files, with
type confusion as well as random bytes. Every outcome is a checkpoint whose tensors all read, or a
SurgeryError; never another exception, a hang, or a read outside the checkpoint's folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "F128", ""]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
small_ints = st.integers(min_value=-2, max_value=40)
shapes = st.one_of(st.lists(st.integers(min_value=0, max_value=6), max_size=3), json_values)
offsets = st.one_of(st.lists(small_ints, min_size=2, max_size=2), json_values)
dtypes = st.one_of(st.sampled_from(["F32", "F16", "I8", "BOOL", "U8", "F64", "I64"]), json_values)
entries = st.one_of(
    st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}),
    st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets},
                          optional={"extra": json_values}),
    json_values,
)
headers = st.dictionaries(st.one_of(st.text(max_size=10), st.just("__metadata__")), entries, max_size=4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory) -> Path:
    """A model folder with one shard and a link to a file outside it, and an outside shard."""
    d = tmp_path_factory.mktemp("fuzz-index")
    (d / "outside").mkdir()
    save_file({"a": torch.full((2,), 7.0)}, d / "outside" / "o.safetensors")
    m = d / "model"
    m.mkdir()
    save_file({"a": torch.zeros(2), "b": torch.zeros(3)}, m / "s1.safetensors")
    (m / "link.safetensors").symlink_to(d / "outside" / "o.safetensors")
    return m


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-config")
    save_file({"a": torch.zeros(2)}, d / "model.safetensors")
    return d


def _read_all(path: Path) -> None:
    """Open, then read every tensor: success or SurgeryError only."""
    try:
        ckpt = Checkpoint.open(path)
        for name in ckpt:
            t = ckpt.get(name)
            assert tuple(t.shape) == ckpt.shape(name)
        ckpt.close()
    except SurgeryError:
        pass  # the project's error: the CLI prints it as one escaped line


def _header_file(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@fuzz(900)
@given(header=headers, data=st.binary(max_size=64))
def test_fuzzed_headers(workdir, header, data):
    _header_file(workdir / "m.safetensors", json.dumps(header).encode(), data)
    _read_all(workdir / "m.safetensors")


def _valid_bytes() -> bytes:
    from safetensors.torch import save

    return save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8)},
                metadata={"k": "v"})


VALID = _valid_bytes()


@fuzz(900)
@given(edits=st.lists(st.tuples(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(0, 255)),
                      max_size=6),
       cut=st.integers(min_value=0, max_value=len(VALID)))
def test_mutated_bytes(workdir, edits, cut):
    raw = bytearray(VALID[:cut] if cut < len(VALID) and cut % 3 == 0 else VALID)
    for pos, value in edits:
        if pos < len(raw):
            raw[pos] = value
    (workdir / "m.safetensors").write_bytes(bytes(raw))
    _read_all(workdir / "m.safetensors")


shard_names = st.one_of(st.sampled_from(["s1.safetensors", "../outside/o.safetensors", "/etc/passwd", "",
                                         "link.safetensors", ".", "s1.safetensors/.."]), json_values)


@fuzz(400)
@given(index=st.one_of(json_values, st.fixed_dictionaries(
    {"weight_map": st.one_of(st.dictionaries(st.sampled_from(["a", "b", "c"]), shard_names, max_size=3),
                             json_values)}, optional={"metadata": json_values})))
def test_fuzzed_indexes(index_folder, index):
    m = index_folder
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint.open(m)
    except SurgeryError:
        return
    for name in ckpt:  # whatever opened holds only data from inside the folder
        assert ckpt.info(name).file.resolve().parent == m.resolve()
        assert not torch.equal(ckpt.get(name), torch.full((2,), 7.0))


@fuzz(400)
@given(config=st.one_of(json_values, st.dictionaries(
    st.sampled_from(["model_type", "architectures", "num_attention_heads", "hidden_size", "num_hidden_layers",
                     "vocab_size", "n_head", "n_embd", "n_layer"]), json_values, max_size=5)),
       raw=st.one_of(st.none(), st.binary(max_size=30)))
def test_fuzzed_config_json(config_folder, config, raw):
    d = config_folder
    (d / "config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
    try:
        ckpt = Checkpoint.open(d)
    except SurgeryError:
        return
    assert isinstance(ckpt.config, dict)


@pytest.mark.parametrize("depth", [1000, 50000])
def test_deep_json_is_one_error(tmp_path, depth):
    for name, text in [("config.json", "[" * depth + "]" * depth),
                       ("model.safetensors.index.json", '{"weight_map": ' + "[" * depth + "]" * depth + "}")]:
        d = tmp_path / f"{name}-{depth}"
        d.mkdir()
        save_file({"a": torch.zeros(2)}, d / "s1.safetensors")
        (d / name).write_text(text)
        with pytest.raises(SurgeryError):
            Checkpoint.open(d)
