"""Data readers: every format, text through tokenizer.json (checked against transformers' own
tokenizer), the Dataset helpers, check_fits, and each bad input with its message."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.data import Dataset, check_fits, load_data
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from tests.hf_tiny import save_tiny_bert, save_tiny_gpt2


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    elif path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    else:
        torch.save(tensors, path)
    return path


@pytest.fixture
def charlm(fixtures_dir) -> Path:
    return fixtures_dir / "charlm" / "gpt2"


# ----- tensor formats ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin", ".npz"])
def test_features_and_labels_round_trip(tmp_path, suffix):
    x, y = torch.randn(10, 6), torch.arange(10) % 3
    data = load_data(write(tmp_path / f"d{suffix}", {"inputs": x, "labels": y}))
    assert not data.is_tokens and len(data) == 10
    torch.testing.assert_close(data.inputs, x, rtol=0, atol=0)
    assert torch.equal(data.labels, y) and data.labels.dtype == torch.int64


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
def test_tokens_with_mask_round_trip(tmp_path, suffix):
    ids = torch.randint(0, 50, (4, 9), dtype=torch.int32)
    mask = torch.ones(4, 9, dtype=torch.int32)
    mask[1, 5:] = 0
    data = load_data(write(tmp_path / f"t{suffix}", {"input_ids": ids, "attention_mask": mask}))
    assert data.is_tokens and data.input_ids.dtype == torch.int64
    assert torch.equal(data.input_ids, ids.long()) and torch.equal(data.attention_mask, mask.long())


def test_npz_float64_is_read_as_float32(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.linspace(0, 1, 12).reshape(3, 4))
    data = load_data(path)
    assert data.inputs.dtype == torch.float32
    np.testing.assert_allclose(data.inputs.numpy(), np.linspace(0, 1, 12).reshape(3, 4), rtol=1e-7)


def test_samples_and_seq_len(tmp_path):
    ids = torch.arange(60).view(6, 10)
    path = write(tmp_path / "t.safetensors", {"input_ids": ids, "labels": ids.clone()})
    data = load_data(path, samples=4, seq_len=7)
    assert torch.equal(data.input_ids, ids[:4, :7]) and torch.equal(data.labels, ids[:4, :7])
    with pytest.raises(SurgeryError, match=r"t\.safetensors: asked for 7 samples but the file holds 6"):
        load_data(path, samples=7)
    with pytest.raises(SurgeryError, match="samples must be at least 1"):
        load_data(path, samples=0)


# ----- text -------------------------------------------------------------------------------------
def test_text_matches_transformers_tokenizer(tmp_path, charlm):
    from transformers import PreTrainedTokenizerFast

    lines = ["def f(x):", "    return x + 1  # done", "\tprint('hi')"]
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(lines) + "\n\n")  # blank lines are not samples
    data = load_data(path, tokenizer=charlm)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(charlm / "tokenizer.json"), pad_token="[PAD]")
    enc = ref(lines, padding=True, return_tensors="pt")
    assert torch.equal(data.input_ids, enc["input_ids"])
    assert torch.equal(data.attention_mask, enc["attention_mask"])


def test_text_truncates_and_pads_to_seq_len(tmp_path, charlm):
    path = tmp_path / "calib.txt"
    path.write_text("abcdefghij\nxy\n")
    data = load_data(path, tokenizer=charlm / "tokenizer.json", seq_len=5)
    pad = 0  # [PAD] is id 0 in the fixture tokenizer
    assert data.input_ids.shape == (2, 5)
    assert data.attention_mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert data.input_ids[1, 2:].tolist() == [pad] * 3


CHAR_TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "charlm" / "llama" / "tokenizer.json"
ADDED_TOKENS = [t["content"] for t in json.loads(CHAR_TOKENIZER.read_text())["added_tokens"]]  # [PAD], [UNK]


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(st.text(string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""),
                        min_size=1, max_size=30).filter(
                            lambda s: s.strip() and "\n" not in s and not any(t in s for t in ADDED_TOKENS)),
                min_size=1, max_size=6))
def test_text_round_trip_property(lines, tmp_path_factory):
    """Character tokenizer: the kept tokens of each row decode back to the line. Lines that hold an
    added token ("[PAD]") are left out: the tokenizer matches those whole, as it should."""
    from tokenizers import Tokenizer

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "charlm" / "llama"
    path = tmp_path_factory.mktemp("txt") / "lines.txt"
    path.write_text("\n".join(lines))
    data = load_data(path, tokenizer=folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert data.input_ids.shape[1] == max(len(s) for s in lines)
    for row, line in enumerate(lines):
        kept = data.input_ids[row][data.attention_mask[row].bool()].tolist()
        assert tok.decode(kept) == line


def test_text_without_tokenizer(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("hello\n")
    with pytest.raises(SurgeryError, match=r"calib\.txt is text; calibrating on text needs the model folder's "
                                           r"tokenizer\.json"):
        load_data(path)


def test_tokenizer_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "calib.txt").write_text("hello\n")
    (tmp_path / "model").mkdir()
    with pytest.raises(SurgeryError, match=r"model/tokenizer\.json: no tokenizer\.json here"):
        load_data(tmp_path / "calib.txt", tokenizer=tmp_path / "model")


def test_empty_text_and_binary(tmp_path, charlm):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SurgeryError, match=r"empty\.txt: text file has no samples"):
        load_data(tmp_path / "empty.txt", tokenizer=charlm)
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(SurgeryError, match=r"blob\.dat: unknown data format"):
        load_data(tmp_path / "blob.dat", tokenizer=charlm)


# ----- bad tensor files -------------------------------------------------------------------------
def test_missing_file_and_folder(tmp_path):
    with pytest.raises(SurgeryError, match=r"nope\.safetensors: no such file"):
        load_data(tmp_path / "nope.safetensors")
    with pytest.raises(SurgeryError, match="is a folder"):
        load_data(tmp_path)


@pytest.mark.parametrize("tensors, message", [
    ({"x": torch.zeros(2, 3)}, r"holds no 'inputs' or 'input_ids' tensor \(found: x\)"),
    ({"inputs": torch.zeros(2, 3), "input_ids": torch.zeros(2, 3, dtype=torch.long)},
     "holds both 'inputs' and 'input_ids'"),
    ({"input_ids": torch.zeros(2, 3)}, "tensor 'input_ids' must be integer"),
    ({"inputs": torch.zeros(3)}, r"tensor 'inputs' has shape \[3\]"),
    ({"inputs": torch.zeros(2, 3), "labels": torch.zeros(2)}, "tensor 'labels' must hold integer class indices"),
    ({"inputs": torch.zeros(2, 3), "labels": torch.zeros(3, dtype=torch.long)},
     r"tensor 'labels' has \[3\], expected 2 samples"),
    ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
     "tensor 'attention_mask' has shape"),
])
def test_bad_tensors(tmp_path, tensors, message):
    path = write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(SurgeryError, match=r"bad\.safetensors: " + message):
        load_data(path)


def test_truncated_safetensors(tmp_path):
    path = write(tmp_path / "cut.safetensors", {"inputs": torch.zeros(4, 4)})
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(SurgeryError, match=r"cut\.safetensors: not a readable \.safetensors data file"):
        load_data(path)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"inputs": torch.zeros(2, 2), "evil": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(SurgeryError, match=r"evil\.pt: not a readable \.pt data file"):
        load_data(tmp_path / "evil.pt")
    assert not marker.exists()


def test_pt_holding_a_list(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(SurgeryError, match=r"list\.pt: expected a dict of named tensors"):
        load_data(tmp_path / "list.pt")


# ----- Dataset helpers and fitting a model --------------------------------------------------------
def test_batches_cover_the_data_in_order():
    x = torch.randn(10, 4)
    data = Dataset("mem", inputs=x, labels=torch.arange(10))
    batches = list(data.batches(4))
    assert [len(b["input"]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["input"] for b in batches]), x)
    with pytest.raises(SurgeryError, match="batch size must be at least 1"):
        list(data.batches(0))


def test_model_inputs_follow_family_input_names(tmp_path):
    gpt2 = detect_family(Checkpoint.open(save_tiny_gpt2(tmp_path / "g")))
    bert = detect_family(Checkpoint.open(save_tiny_bert(tmp_path / "b")))
    ids = torch.randint(0, 97, (3, 8))
    data = Dataset("mem", input_ids=ids)
    g = data.model_inputs(gpt2)
    assert list(g) == gpt2.input_names() and torch.equal(g["attention_mask"], torch.ones_like(ids))
    b = data.model_inputs(bert)
    assert list(b) == bert.input_names() and torch.equal(b["token_type_ids"], torch.zeros_like(ids))
    with pytest.raises(SurgeryError, match="mem: holds feature inputs but the gpt2 model takes token ids"):
        Dataset("mem", inputs=torch.randn(3, 8)).model_inputs(gpt2)


def test_check_fits(tmp_path, fixtures_dir):
    mlp = detect_family(Checkpoint.open(fixtures_dir / "digits" / "mlp_seed0.safetensors"))
    check_fits(mlp, Dataset("ok", inputs=torch.randn(2, 64)))
    check_fits(mlp, Dataset("image", inputs=torch.randn(2, 1, 8, 8)))
    with pytest.raises(SurgeryError, match=r"narrow: samples of shape \[32\] \(32 values\) do not fit the mlp model"):
        check_fits(mlp, Dataset("narrow", inputs=torch.randn(2, 32)))
    with pytest.raises(SurgeryError, match="ids: holds token ids but the mlp model takes feature inputs"):
        check_fits(mlp, Dataset("ids", input_ids=torch.zeros(2, 64, dtype=torch.long)))
    gpt2 = detect_family(Checkpoint.open(save_tiny_gpt2(tmp_path / "g")))  # vocab 97, 64 positions
    check_fits(gpt2, Dataset("ok", input_ids=torch.full((2, 64), 96)))
    with pytest.raises(SurgeryError, match="big: token id 97 is beyond the gpt2 model's vocabulary of 97"):
        check_fits(gpt2, Dataset("big", input_ids=torch.full((2, 4), 97)))
    with pytest.raises(SurgeryError, match="long: sequences of 65 tokens are longer than the gpt2 model's 64"):
        check_fits(gpt2, Dataset("long", input_ids=torch.zeros(2, 65, dtype=torch.long)))


def test_data_files_must_be_regular_and_hold_dense_tensors(tmp_path):
    """Issue #14 items 10 and 14: a FIFO as --calib/--eval blocked forever; meta/sparse tensors have no data."""
    import os

    fifo = tmp_path / "calib.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SurgeryError, match="not a regular file"):
        load_data(fifo)
    for bad, words in [(torch.empty(4, 3, device="meta"), "meta tensor"), (torch.eye(3).to_sparse(), "sparse")]:
        torch.save({"inputs": bad}, tmp_path / "d.pt")
        with pytest.raises(SurgeryError, match=words):
            load_data(tmp_path / "d.pt")
