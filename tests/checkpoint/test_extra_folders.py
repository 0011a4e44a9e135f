"""Sub-folders of a model folder (sentence-transformers' 1_Pooling/, 2_Dense/: the modules in modules.json)
are carried into every output folder byte for byte; links out of the folder, stale weight copies and
hidden folders are not."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from modelsurgery.checkpoint import Checkpoint, plan_tensor, write_checkpoint
from modelsurgery.cli.app import app
from modelsurgery.errors import SurgeryError, SurgeryWarning
from tests.hf_tiny import save_tiny_bert

runner = CliRunner()

# the layout sentence-transformers' SentenceTransformer.save writes for a BERT encoder + mean pooling +
# a Dense projection + normalization: the encoder at the top, each further module in the folder named in
# modules.json (1_Pooling/config.json with the pooling_mode_* keys of sentence-transformers 2-3, as on the
# hub for all-MiniLM-L6-v2; 3_Normalize/config.json as 6.x writes it, older versions leave the folder empty)
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
]
POOLING = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
           "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True}


def sentence_transformers_folder(folder: Path, seed: int = 0) -> Path:
    save_tiny_bert(folder, seed=seed)
    (folder / "modules.json").write_text(json.dumps(MODULES, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(POOLING, indent=2))
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 32, "out_features": 16, "bias": True,
         "activation_function": "torch.nn.modules.linear.Identity"}))
    gen = torch.Generator().manual_seed(seed)
    save_file({"linear.weight": torch.randn(16, 32, generator=gen), "linear.bias": torch.randn(16, generator=gen)},
              folder / "2_Dense" / "model.safetensors")
    (folder / "3_Normalize").mkdir()
    (folder / "3_Normalize" / "config.json").write_text(json.dumps(
        {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}, indent=4))
    (folder / "4_Empty").mkdir()  # an empty folder: nothing to carry
    return folder


def module_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.parts[len(folder.parts)].startswith(("1_", "2_", "3_"))}


@pytest.fixture(scope="module")
def st_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("st")
    return sentence_transformers_folder(root / "a", 0), sentence_transformers_folder(root / "b", 1)


def invoke(*args: str) -> None:
    r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == 0, r.output


def assert_modules_carried(src: Path, out: Path) -> None:
    want = module_files(src)
    assert set(want) == {"1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
                         "3_Normalize/config.json"}
    assert module_files(out) == want  # the same names, the same bytes
    assert (out / "modules.json").read_bytes() == (src / "modules.json").read_bytes()
    assert not (out / "4_Empty").exists()


@pytest.mark.parametrize("command", ["merge", "grow", "quantize", "dequantize"])
def test_sub_folders_reach_every_output(st_pair, tmp_path, command):
    a, b = st_pair
    out = tmp_path / "out"
    if command == "merge":
        invoke("merge", str(a), str(b), "-o", str(out))
    elif command == "grow":
        invoke("grow", str(a), "-o", str(out), "--method", "stack", "--factor", "2")
    elif command == "quantize":
        invoke("quantize", str(a), "-o", str(out), "--method", "rtn", "--bits", "4", "--format", "fake")
    else:
        packed = tmp_path / "packed"
        invoke("quantize", str(a), "-o", str(packed), "--method", "rtn", "--bits", "4", "--format", "packed")
        assert_modules_carried(a, packed)
        invoke("dequantize", str(packed), "-o", str(out))
    assert_modules_carried(a, out)
    # the output's own weights are the model's, not 2_Dense's: the Dense weights stay in their folder
    assert not any(k.startswith("linear.") for k in Checkpoint.open(out))


def test_force_replaces_an_output_with_sub_folders(st_pair, tmp_path):
    """--force recognises the carried sub-folders as written by us (listed in modelsurgery.files)."""
    a, _ = st_pair
    out = tmp_path / "out"
    for _ in range(2):
        invoke("quantize", str(a), "-o", str(out), "--method", "rtn", "--bits", "4", "--format", "fake", "--force")
    assert_modules_carried(a, out)
    (out / "1_Pooling" / "notes.txt").write_text("mine")  # a file we did not write: --force refuses
    r = runner.invoke(app, ["quantize", str(a), "-o", str(out), "--method", "rtn", "--bits", "4", "--force"])
    assert r.exit_code == 1 and "1_Pooling/notes.txt" in r.output and "did not write" in r.output
    assert (out / "1_Pooling" / "notes.txt").read_text() == "mine"


def _copy_tensors(ckpt: Checkpoint, out: Path) -> None:
    write_checkpoint(out, [plan_tensor(k, ckpt.get(k)) for k in ckpt], config=ckpt.config,
                     extra_files=ckpt.extra_files())


def test_link_out_of_the_folder_is_not_followed(tmp_path):
    src = sentence_transformers_folder(tmp_path / "st")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the model folder")
    (src / "1_Pooling" / "leak.txt").symlink_to(secret)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.json").write_text("{}")
    (src / "4_Linked").symlink_to(outside, target_is_directory=True)  # a sub-folder that is itself a link out
    (src / "1_Pooling" / "loop").symlink_to(src, target_is_directory=True)  # a link to a folder, even inside
    with pytest.warns(SurgeryWarning) as caught:
        carried = Checkpoint.open(src).extra_files()
    messages = [str(w.message) for w in caught]
    assert any("leak.txt: not carried" in m and "outside the checkpoint folder" in m for m in messages)
    assert any("4_Linked: not carried" in m for m in messages)
    assert any("loop: not carried" in m for m in messages)
    names = {c.name for c in carried}
    assert "1_Pooling/config.json" in names and not any(n.startswith(("4_Linked", "1_Pooling/l")) for n in names)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryWarning)
        _copy_tensors(Checkpoint.open(src), out)
    assert (out / "1_Pooling" / "config.json").read_bytes() == (src / "1_Pooling" / "config.json").read_bytes()
    assert not (out / "1_Pooling" / "leak.txt").exists() and not (out / "4_Linked").exists()
    assert not any("outside the model folder" in p.read_text(errors="replace") for p in out.rglob("*")
                   if p.is_file() and p.suffix != ".safetensors")


def test_link_inside_the_folder_is_carried_as_a_copy(tmp_path):
    """A hub snapshot's files are links into its blobs: a link that stays inside is copied as a file."""
    src = sentence_transformers_folder(tmp_path / "st")
    (src / "blob").write_text(json.dumps(POOLING))
    (src / "1_Pooling" / "config.json").unlink()
    (src / "1_Pooling" / "config.json").symlink_to(src / "blob")
    out = tmp_path / "out"
    _copy_tensors(Checkpoint.open(src), out)
    assert not (out / "1_Pooling" / "config.json").is_symlink()
    assert (out / "1_Pooling" / "config.json").read_text() == json.dumps(POOLING)


def test_hidden_and_stale_weight_folders_are_not_carried(tmp_path):
    src = sentence_transformers_folder(tmp_path / "st")
    (src / ".cache").mkdir()
    (src / ".cache" / "lock").write_text("")
    (src / "1_Pooling" / ".hidden").write_text("x")
    (src / "onnx").mkdir()  # an export of the model being rewritten: stale once it is rewritten
    (src / "onnx" / "model.onnx").write_bytes(b"\x08\x07")
    (src / "onnx" / "config.json").write_text("{}")
    (src / "docs").mkdir()  # no weights: carried though modules.json does not list it
    (src / "docs" / "notes.md").write_text("how to use")
    with pytest.warns(SurgeryWarning, match=r"onnx: not carried into the output: it holds weight files"):
        names = {c.name for c in Checkpoint.open(src).extra_files()}
    assert names >= {"1_Pooling/config.json", "2_Dense/model.safetensors", "docs/notes.md", "modules.json"}
    assert not any(n.startswith((".cache", "onnx")) or n.endswith(".hidden") for n in names)


def test_a_sub_folder_holding_the_models_own_weights_is_not_carried(tmp_path):
    """An index whose shards live in a sub-folder: those shards are what the output replaces."""
    folder = tmp_path / "m"
    (folder / "shards").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, folder / "shards" / "part1.safetensors")
    (folder / "shards" / "readme.txt").write_text("shards")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    index = {"metadata": {}, "weight_map": {"a": "shards/part1.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint.open(folder)
    except SurgeryError:
        pytest.skip("the reader refuses shards outside the index's folder")
    with pytest.warns(SurgeryWarning, match="a weight file of the model this output rewrites"):
        assert not any(c.name.startswith("shards") for c in ckpt.extra_files())


def test_carried_names_stay_inside_the_output(tmp_path):
    from modelsurgery.checkpoint.carry import CarriedFile

    f = tmp_path / "x.json"
    f.write_text("{}")
    for bad in ("../x.json", "/etc/x.json", "a/../../x.json", "a//x.json"):
        with pytest.raises(SurgeryError, match="not a path inside the output folder"):
            CarriedFile(f, bad)
    assert os.fspath(CarriedFile(f, "sub/x.json")) == str(f)


def test_sentence_transformers_loads_the_output(tmp_path):
    """With sentence-transformers installed (not a test dependency): a folder it saved itself, quantized
    (fake, 8-bit), loads back with every module and gives the same embeddings within 8-bit rounding."""
    st = pytest.importorskip("sentence_transformers")
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
                                "the", "cat", "dog"]) + "\n")
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=34, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(hf)
    BertTokenizer(str(vocab)).save_pretrained(hf)
    m = pytest.importorskip("sentence_transformers.models")
    model = st.SentenceTransformer(modules=[m.Transformer(str(hf), max_seq_length=32), m.Pooling(32, "mean"),
                                            m.Dense(32, 16), m.Normalize()])
    src, out = tmp_path / "st", tmp_path / "q8"
    model.save(str(src))
    invoke("quantize", str(src), "-o", str(out), "--method", "rtn", "--bits", "8", "--format", "fake")
    got = st.SentenceTransformer(str(out))
    assert [type(x).__name__ for x in got] == [type(x).__name__ for x in model]
    sentences = ["the cat", "a dog"]
    ref = st.SentenceTransformer(str(src)).encode(sentences, convert_to_tensor=True)
    emb = got.encode(sentences, convert_to_tensor=True)
    assert emb.shape == (2, 16)
    assert torch.nn.functional.cosine_similarity(emb, ref).min() > 0.99
