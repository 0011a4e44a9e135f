"""Bad input through the CLI: each case exits non-zero with one line on stderr naming the file, no
traceback, and nothing written. Pickled code must never run."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from modelsurgery.cli.app import app

runner = CliRunner()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(start, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


class WritesMarker:
    """Unpickling this runs Path.touch(marker): a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _valid_safetensors(path: Path) -> bytes:
    save_file({"a": torch.randn(4, 4), "b": torch.randn(3)}, path)
    return path.read_bytes()


def make_case(case: str, root: Path) -> Path:
    p = root / "bad.safetensors"
    if case == "missing":
        return root / "does_not_exist.safetensors"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "truncated":
        full = _valid_safetensors(p)
        p.write_bytes(full[:-10])
    elif case == "truncated_header":
        full = _valid_safetensors(p)
        p.write_bytes(full[:20])
    elif case == "not_json":
        p.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 8)
    elif case == "not_utf8":
        p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc")
    elif case == "json_list":
        p.write_bytes(struct.pack("<Q", 2) + b"[]")
    elif case == "huge_header_length":
        p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    elif case == "overlap":
        p.write_bytes(_safetensors_bytes({"a": _entry(0, 8), "b": _entry(4, 12)}, b"\0" * 12))
    elif case == "gap":
        p.write_bytes(_safetensors_bytes({"a": _entry(0, 8), "b": _entry(12, 20)}, b"\0" * 20))
    elif case == "beyond_end":
        p.write_bytes(_safetensors_bytes({"a": _entry(0, 8), "b": _entry(8, 16)}, b"\0" * 10))
    elif case == "size_mismatch":
        p.write_bytes(_safetensors_bytes({"a": _entry(0, 12, shape=(2,))}, b"\0" * 12))
    elif case == "padding_after_data":
        p.write_bytes(_safetensors_bytes({"a": _entry(0, 8)}, b"\0" * 16))
    elif case == "bad_dtype":
        p.write_bytes(_safetensors_bytes({"a": _entry(0, 8, dtype="F128")}, b"\0" * 8))
    elif case == "negative_shape":
        p.write_bytes(_safetensors_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}, b""))
    elif case == "entry_not_object":
        p.write_bytes(_safetensors_bytes({"a": [1, 2, 3]}, b""))
    elif case == "text_file":
        p = root / "notes.txt"
        p.write_text("these are not weights\n" * 20)
    elif case == "text_as_safetensors":
        p.write_text("hello, I only look like a checkpoint\n" * 10)
    elif case == "text_as_pt":
        p = root / "model.pt"
        p.write_text("not a pickle at all\n")
    elif case == "empty_dir":
        p = root / "folder"
        p.mkdir()
        (p / "README.md").write_text("no weights here")
    elif case == "dir_bad_config":
        p = root / "folder"
        p.mkdir()
        (p / "config.json").write_text("{broken")
        save_file({"a": torch.zeros(2)}, p / "model.safetensors")
    elif case == "dir_two_safetensors_no_index":
        p = root / "folder"
        p.mkdir()
        save_file({"a": torch.zeros(2)}, p / "one.safetensors")
        save_file({"b": torch.zeros(2)}, p / "two.safetensors")
    elif case == "index_missing_shard":
        p = root / "folder"
        p.mkdir()
        (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    elif case == "index_malformed":
        p = root / "folder"
        p.mkdir()
        (p / "model.safetensors.index.json").write_text(json.dumps({"no_weight_map": 1}))
    elif case == "index_tensor_not_in_shard":
        p = root / "folder"
        p.mkdir()
        save_file({"a": torch.zeros(2)}, p / "s1.safetensors")
        (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"zzz": "s1.safetensors"}}))
    elif case == "pickle_no_tensors":
        p = root / "model.pt"
        torch.save({"epoch": 3, "lr": 0.1, "name": "run"}, p)
    elif case == "pickle_bare_tensor":
        p = root / "model.pt"
        torch.save(torch.zeros(3), p)
    elif case == "pickle_list":
        p = root / "model.pt"
        torch.save([torch.zeros(3)], p)
    elif case == "truncated_pickle":
        p = root / "model.pt"
        torch.save({"w": torch.randn(64, 64)}, p)
        p.write_bytes(p.read_bytes()[:300])
    elif case in HOSTILE_HEADERS:
        header, data = HOSTILE_HEADERS[case]
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    elif case in HOSTILE_INDEXES:
        p = root / "folder"
        p.mkdir()
        save_file({"a": torch.zeros(2)}, p / "s1.safetensors")
        outside = root / "outside"
        outside.mkdir()
        save_file({"a": torch.ones(2)}, outside / "evil.safetensors")
        (outside / "secret.bin").write_bytes(b"TOPSECRET" * 10)
        (p / "link.safetensors").symlink_to(outside / "evil.safetensors")
        raw = HOSTILE_INDEXES[case]
        raw = raw.replace("OUTSIDE", str(outside)) if isinstance(raw, str) else json.dumps(raw)
        (p / "model.safetensors.index.json").write_text(raw)
    elif case == "bin_index_outside":
        p = root / "folder"
        p.mkdir()
        (root / "outside").mkdir()
        torch.save({"a": torch.ones(2)}, root / "outside" / "w.bin")
        (p / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../outside/w.bin"}}))
    elif case == "index_shard_has_unlisted_tensor":
        p = root / "folder"
        p.mkdir()
        save_file({"a": torch.zeros(2), "lm_head.weight": torch.zeros(2)}, p / "s1.safetensors")
        (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    elif case in CONFIG_CONFUSION:
        p = root / "folder"
        p.mkdir()
        (p / "config.json").write_text(CONFIG_CONFUSION[case])
        save_file({"a": torch.zeros(2)}, p / "model.safetensors")
    elif case in PICKLE_CASES:
        p = root / "model.pt"
        torch.save(PICKLE_CASES[case](), p)
    elif case == "fifo":
        p = root / "pipe.safetensors"
        os.mkfifo(p)
    elif case == "fifo_in_folder":
        p = root / "folder"
        p.mkdir()
        os.mkfifo(p / "model.safetensors")
    else:
        raise AssertionError(case)
    return p


def _deep(n):
    d = {"w": torch.zeros(1)}
    for _ in range(n):
        d = {"x": d}
    return d


# header cases the first check let through (issue #14, item 11 and 13): each must be one clean line
HOSTILE_HEADERS = {
    "shape_2_pow_70": ({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b""),
    "shape_object": ({"a": {"dtype": "F32", "shape": {}, "data_offsets": [0, 4]}}, b"\0" * 4),
    "shape_bools": ({"a": {"dtype": "F32", "shape": [True, True], "data_offsets": [0, 4]}}, b"\0" * 4),
    "shape_null": ({"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 4]}}, b"\0" * 4),
    "shape_int": ({"a": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets_bools": ({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]}}, b"\0"),
    "dtype_list": ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "dtype_object": ({"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "metadata_not_strings": ({"__metadata__": {"n": 1}, "a": _entry(0, 8)}, b"\0" * 8),
    "metadata_list": ({"__metadata__": ["x"], "a": _entry(0, 8)}, b"\0" * 8),
    "extra_entry_key": ({"a": {**_entry(0, 8), "evil": 1}}, b"\0" * 8),
    "deep_nesting": (b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}", b""),
    "huge_integer": (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4),
}
HOSTILE_INDEXES = {
    "index_parent_path": {"weight_map": {"a": "../outside/evil.safetensors"}},
    "index_absolute_path": '{"weight_map": {"a": "OUTSIDE/evil.safetensors"}}',
    "index_symlink_outside": {"weight_map": {"a": "link.safetensors"}},
    "index_secret_file": '{"weight_map": {"a": "OUTSIDE/secret.bin"}}',
    "index_value_int": {"weight_map": {"a": 3}},
    "index_value_null": {"weight_map": {"a": None}},
    "index_value_list": {"weight_map": {"a": ["s1.safetensors"]}},
    "index_not_object": [1, 2],
}
CONFIG_CONFUSION = {"config_list": "[1, 2]", "config_string": '"llama"', "config_deep": "[" * 50000 + "]" * 50000}
PICKLE_CASES = {
    "pickle_ambiguous_names": lambda: {"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}},
    "pickle_tensor_in_list": lambda: {"w": torch.zeros(2), "blocks": [torch.zeros(2)]},
    "pickle_meta_tensor": lambda: {"w": torch.empty(2, 2, device="meta")},
    "pickle_sparse_tensor": lambda: {"w": torch.eye(3).to_sparse()},
    "pickle_nested_tensor": lambda: {"w": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])},
    "pickle_deep_dicts": lambda: _deep(100),
}


CASES = [
    "missing", "empty", "short", "truncated", "truncated_header", "not_json", "not_utf8", "json_list",
    "huge_header_length", "overlap", "gap", "beyond_end", "size_mismatch", "padding_after_data", "bad_dtype",
    "negative_shape", "entry_not_object", "text_file", "text_as_safetensors", "text_as_pt", "empty_dir",
    "dir_bad_config", "dir_two_safetensors_no_index", "index_missing_shard", "index_malformed",
    "index_tensor_not_in_shard", "pickle_no_tensors", "pickle_bare_tensor", "pickle_list", "truncated_pickle",
    *HOSTILE_HEADERS, *HOSTILE_INDEXES, "bin_index_outside", "index_shard_has_unlisted_tensor", *CONFIG_CONFUSION,
    *PICKLE_CASES, "fifo", "fifo_in_folder",
]


def assert_clean_failure(result, named: Path) -> str:
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(named) in lines[0] or named.name in lines[0], lines[0]
    assert result.stdout.strip() == ""
    return lines[0]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clean_line(tmp_path, case, json_flag):
    path = make_case(case, tmp_path)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["inspect", str(path), *json_flag])
    line = assert_clean_failure(result, path)
    assert line.startswith("error:")
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


HEADER_LIES = {
    "overlap": "overlaps",
    "gap": "gap",
    "beyond_end": "data region",
    "size_mismatch": "lies",
    "truncated": "truncated",
    "not_json": "malformed",
    "text_as_pt": "not a readable PyTorch checkpoint",
    "truncated_pickle": "not a readable PyTorch checkpoint",
    "pickle_no_tensors": "no tensors",
    "empty_dir": "no weights",
    "missing": "no such file",
}


HOSTILE_WORDS = {
    "shape_2_pow_70": "invalid shape", "shape_object": "invalid shape", "shape_bools": "invalid shape",
    "shape_null": "invalid shape", "shape_int": "invalid shape", "offsets_bools": "invalid data_offsets",
    "dtype_list": "unsupported dtype", "dtype_object": "unsupported dtype",
    "metadata_not_strings": "__metadata__", "metadata_list": "__metadata__", "extra_entry_key": "exactly dtype",
    "deep_nesting": "malformed", "huge_integer": "malformed",
    "index_parent_path": "outside the checkpoint folder", "index_absolute_path": "outside the checkpoint folder",
    "index_symlink_outside": "outside the checkpoint folder", "index_secret_file": "outside the checkpoint folder",
    "bin_index_outside": "outside the checkpoint folder",
    "index_value_int": "expected a file name", "index_value_null": "expected a file name",
    "index_value_list": "expected a file name", "index_not_object": "expected an object",
    "index_shard_has_unlisted_tensor": "'lm_head.weight' is in s1.safetensors but not in the index",
    "config_list": "config.json", "config_string": "config.json", "config_deep": "config.json",
    "pickle_ambiguous_names": "both named 'a.b'", "pickle_tensor_in_list": "'blocks' holds tensors inside a list",
    "pickle_meta_tensor": "meta tensor", "pickle_sparse_tensor": "sparse", "pickle_nested_tensor": "nested tensor",
    "pickle_deep_dicts": "nested deeper", "fifo": "not a regular file", "fifo_in_folder": "not a regular file",
}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("case,words", sorted(HOSTILE_WORDS.items()))
def test_hostile_inputs_are_explained(tmp_path, case, words):
    """Issue #14 items 1, 10, 11, 13, 14: each hostile checkpoint is refused with a line that says why."""
    path = make_case(case, tmp_path)
    line = assert_clean_failure(runner.invoke(app, ["inspect", str(path)]), path)
    assert words in line, line
    assert "TOPSECRET" not in line


def test_no_file_contents_leak_from_a_path_pointed_at_a_secret(tmp_path):
    """A checkpoint path that is a secret text file: the message names neither its size nor its first
    bytes (the header length read from them)."""
    secret = tmp_path / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 3)
    link = tmp_path / "model.safetensors"
    link.symlink_to(secret)
    line = assert_clean_failure(runner.invoke(app, ["inspect", str(link)]), link)
    n = int.from_bytes(secret.read_bytes()[:8], "little")
    line = line.replace(str(link), "PATH")  # the temporary folder's name may hold the digits of the size
    assert str(n) not in line and str(secret.stat().st_size) not in line and "root:x" not in line


@pytest.mark.parametrize("case,words", sorted(HEADER_LIES.items()))
def test_header_problems_are_explained(tmp_path, case, words):
    path = make_case(case, tmp_path)
    line = assert_clean_failure(runner.invoke(app, ["inspect", str(path)]), path)
    assert words in line


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch_save", "plain_pickle", "inside_state_dict"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "code_ran.marker"
    path = tmp_path / "evil.pt"
    evil = WritesMarker(marker)
    if how == "torch_save":
        torch.save(evil, path)
    elif how == "plain_pickle":
        path.write_bytes(pickle.dumps(evil))
    else:
        torch.save({"state_dict": {"w": torch.zeros(2), "hook": evil}}, path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(evil))  # the payload is real: ordinary unpickling runs it
    assert marker.exists()
    marker.unlink()
    before = _snapshot(tmp_path)
    line = assert_clean_failure(runner.invoke(app, ["inspect", str(path)]), path)
    # a torch.save file naming a foreign class is refused as code; a plain pickle is not a torch file
    assert ("refused" if how != "plain_pickle" else "not a readable") in line
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert _snapshot(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path):
    path = make_case("overlap", tmp_path)
    result = runner.invoke(app, ["inspect", str(path), "--debug"])
    assert result.exit_code != 0 and result.exception is not None
    assert "overlaps" in str(result.exception)


def test_bad_model_factory_is_one_clean_line(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"weight": torch.zeros(2)}, path)
    for spec, words in [("no_such_pkg_xyz.mod:fn", "cannot import"), ("tests.custom_models:nope", "no function"),
                        ("tests.custom_models:digits_mlp", "missing"), ("nocolon", "expected")]:
        result = runner.invoke(app, ["inspect", str(path), "--model", spec])
        assert result.exit_code == 1 and "Traceback" not in result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], lines
        assert spec in lines[0] or str(path) in lines[0], lines
