"""Bad input through the CLI: each case exits non-zero with one line on stderr naming the file, no
traceback, and nothing written. Pickled code must never run."""

from __future__ import annotations

import json
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
    else:
        raise AssertionError(case)
    return p


CASES = [
    "missing", "empty", "short", "truncated", "truncated_header", "not_json", "not_utf8", "json_list",
    "huge_header_length", "overlap", "gap", "beyond_end", "size_mismatch", "padding_after_data", "bad_dtype",
    "negative_shape", "entry_not_object", "text_file", "text_as_safetensors", "text_as_pt", "empty_dir",
    "dir_bad_config", "dir_two_safetensors_no_index", "index_missing_shard", "index_malformed",
    "index_tensor_not_in_shard", "pickle_no_tensors", "pickle_bare_tensor", "pickle_list", "truncated_pickle",
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
