"""A tied model saved as a PyTorch pickle (``torch.save(model.state_dict())``, what transformers 4's
``save_pretrained(safe_serialization=False)`` writes) holds the head and the embedding as one storage
under two names. It must read as the same tied model the safetensors folder of that model is (which
has no ``lm_head.weight``): quantize, merge, grow and export give the safetensors folder's outputs,
checked by transformers and ONNX Runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.cli.app import app
from modelsurgery.families import detect_family
from tests.hf_tiny import load_hf, save_tiny_decoder, save_tiny_gpt2

runner = CliRunner()
HEAD = {"llama3": ("lm_head.weight", "model.embed_tokens.weight"), "gpt2": ("lm_head.weight", "transformer.wte.weight")}


def save(kind: str, folder: Path, seed: int) -> Path:
    return save_tiny_gpt2(folder, seed=seed) if kind == "gpt2" else save_tiny_decoder(kind, folder, seed=seed)


def pickled(folder: Path, out: Path) -> Path:
    """The same model as ``torch.save`` of transformers' state_dict, beside the same config.json."""
    state = load_hf(folder).state_dict()
    head, embed = HEAD["gpt2" if "transformer.wte.weight" in state else "llama3"]
    assert state[head].untyped_storage().data_ptr() == state[embed].untyped_storage().data_ptr()
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    torch.save(state, out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module", params=["llama3", "gpt2"])
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    st = [save(request.param, root / f"st{i}", seed=i) for i in range(2)]
    return request.param, st, [pickled(f, root / f"pk{i}") for i, f in enumerate(st)]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {k: ckpt.get(k) for k in ckpt}


def logits(folder: Path) -> torch.Tensor:
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return load_hf(folder)(input_ids=ids).logits


def ok(args: list[str]) -> None:
    result = runner.invoke(app, [*map(str, args), "--quiet"])
    assert result.exit_code == 0, result.output


def test_pickle_reads_as_the_tied_safetensors_model(models):
    kind, st, pk = models
    head, embed = HEAD[kind]
    ckpt, reference = Checkpoint.open(pk[0]), Checkpoint.open(st[0])
    assert set(ckpt.keys()) == set(reference.keys()) and head not in ckpt  # transformers 5 writes the tied head once
    assert ckpt.tied == {head: embed}
    family = detect_family(ckpt)
    assert family.tied_weights() == {head: embed} == detect_family(reference).tied_weights()
    assert family.describe()["tied_head"] is True


def test_quantize_rounds_the_head_as_the_embedding(models, tmp_path):
    """RTN with the embedding quantized: the tied head is the rounded embedding, in both inputs' outputs."""
    kind, st, pk = models
    head, embed = HEAD[kind]
    for name, src in (("st", st[0]), ("pk", pk[0])):
        ok(["quantize", src, "-o", tmp_path / name, "--method", "rtn", "--bits", "4", "--no-default-skips"])
    ours, reference = tensors(tmp_path / "pk"), tensors(tmp_path / "st")
    assert ours.keys() == reference.keys() and head not in ours
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert not torch.equal(ours[embed], tensors(st[0])[embed])  # the embedding was rounded
    model = load_hf(tmp_path / "pk")
    assert torch.equal(model.get_output_embeddings().weight, ours[embed].float())
    assert torch.equal(logits(tmp_path / "pk"), logits(tmp_path / "st"))


def test_merge_of_two_pickles_keeps_the_head_tied(models, tmp_path):
    kind, st, pk = models
    head, embed = HEAD[kind]
    ok(["merge", st[0], st[1], "-o", tmp_path / "st"])
    ok(["merge", pk[0], pk[1], "-o", tmp_path / "pk"])
    ours, reference = tensors(tmp_path / "pk"), tensors(tmp_path / "st")
    assert ours.keys() == reference.keys() and head not in ours
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert torch.equal(load_hf(tmp_path / "pk").get_output_embeddings().weight, ours[embed])
    assert torch.equal(logits(tmp_path / "pk"), logits(tmp_path / "st"))


def test_grow_of_a_pickle_equals_grow_of_the_safetensors_folder(models, tmp_path):
    kind, st, pk = models
    for name, src in (("st", st[0]), ("pk", pk[0])):
        ok(["grow", src, "-o", tmp_path / name, "--method", "stack", "--factor", "2"])
    ours, reference = tensors(tmp_path / "pk"), tensors(tmp_path / "st")
    assert ours.keys() == reference.keys() and HEAD[kind][0] not in ours
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert torch.equal(logits(tmp_path / "pk"), logits(tmp_path / "st"))


def test_export_of_a_pickle_holds_the_tied_matrix_once(models, tmp_path):
    """The ONNX file of the pickle is the safetensors folder's (the same vocab x hidden initializers; the
    exporter keeps the head's transpose as a constant of its own for both), and gives the same logits."""
    import onnx
    import onnxruntime as ort

    _, st, pk = models
    files = {}
    for name, src in (("st", st[0]), ("pk", pk[0])):
        ok(["export", src, "-o", tmp_path / f"{name}.onnx"])
        files[name] = onnx.load(str(tmp_path / f"{name}.onnx"))
    vocab = [sorted((i.name, tuple(i.dims)) for i in m.graph.initializer if 97 in i.dims) for m in files.values()]
    assert vocab[0] == vocab[1], vocab
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1)).numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    out = {n: ort.InferenceSession(str(tmp_path / f"{n}.onnx")).run(None, feeds)[0] for n in files}
    assert np.array_equal(out["pk"], out["st"])
    np.testing.assert_allclose(out["pk"], logits(st[0]).numpy(), atol=1e-4)


@pytest.mark.parametrize("tie", [False, None])
def test_config_not_saying_tied_keeps_both_names(tmp_path, tie):
    """tie_word_embeddings=false, or no such key (LlamaConfig's default is false): transformers loads
    lm_head.weight as a weight of its own, so the pickle is an untied model whose head starts equal to the
    embedding; both names stay."""
    import json

    folder = save_tiny_decoder("llama3", tmp_path / "st")
    pk = pickled(folder, tmp_path / "pk")
    config = json.loads((pk / "config.json").read_text())
    config["tie_word_embeddings"] = tie
    if tie is None:
        del config["tie_word_embeddings"]
    (pk / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint.open(pk)
    assert "lm_head.weight" in ckpt and ckpt.tied == {}
    assert ckpt.aliases() == {"lm_head.weight": "model.embed_tokens.weight"}
    assert detect_family(ckpt).tied_weights() == {}
    ok(["merge", pk, pk, "-o", tmp_path / "m"])
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()  # noqa: SIM118


def test_sharded_pickle_reads_the_tie_too(tmp_path):
    """transformers 4 shards a .bin checkpoint keeping tensors that share storage in one shard; the index
    path reads the tie as the single file does."""
    import json

    folder = save_tiny_decoder("llama3", tmp_path / "st")
    state = load_hf(folder).state_dict()
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    first = {k: v for k, v in state.items() if "layers" not in k}  # embedding, head and final norm together
    second = {k: v for k, v in state.items() if k not in first}
    torch.save(first, out / "pytorch_model-00001-of-00002.bin")
    torch.save(second, out / "pytorch_model-00002-of-00002.bin")
    weight_map = {**dict.fromkeys(first, "pytorch_model-00001-of-00002.bin"),
                  **dict.fromkeys(second, "pytorch_model-00002-of-00002.bin")}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = Checkpoint.open(out)
    assert set(ckpt.keys()) == set(Checkpoint.open(folder).keys())
    assert ckpt.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_gguf_of_a_pickle_reads_the_head_from_token_embd(tmp_path):
    """llama.cpp reads a tied head from token_embd when the GGUF has no output.weight: the pickle's GGUF is the
    safetensors folder's, tensor for tensor (read back by the gguf package's own reader)."""
    from gguf import GGUFReader

    st = save_tiny_decoder("llama3", tmp_path / "st", intermediate_size=64)  # rows divisible by GGUF's 32
    pk = pickled(st, tmp_path / "pk")
    files = {}
    for name, src in (("st", st), ("pk", pk)):
        ok(["quantize", src, "-o", tmp_path / f"{name}.gguf", "--method", "rtn", "--format", "gguf",
            "--granularity", "group", "--group-size", "32", "--gguf-tokenizer", "none", "--no-default-skips"])
        files[name] = {t.name: np.array(t.data) for t in GGUFReader(str(tmp_path / f"{name}.gguf")).tensors}
    assert "output.weight" not in files["pk"] and "token_embd.weight" in files["pk"]
    assert files["pk"].keys() == files["st"].keys()
    assert all(np.array_equal(files["pk"][k], files["st"][k]) for k in files["st"])
