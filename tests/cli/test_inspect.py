"""`surgery inspect`: --json fields and family detection, checked against independent counts
(the reference safetensors reader, transformers' own models, the torch modules that made the files)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.hf_tiny import save_tiny_bert, save_tiny_gpt2, save_tiny_llama

runner = CliRunner()
HF = {"gpt2": save_tiny_gpt2, "llama": save_tiny_llama, "bert": save_tiny_bert}


def inspect_json(path, *extra) -> dict:
    result = runner.invoke(app, ["inspect", str(path), "--json", *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # exactly one JSON object on stdout


def _reference_counts(tensors: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    return (len(tensors), sum(t.numel() for t in tensors.values()),
            sum(t.numel() * t.element_size() for t in tensors.values()))


def _check_fields(report: dict, tensors: dict[str, torch.Tensor]) -> None:
    n, params, nbytes = _reference_counts(tensors)
    assert report["num_tensors"] == n and report["num_parameters"] == params and report["num_bytes"] == nbytes
    by_name = {t["name"]: t for t in report["tensors"]}
    assert set(by_name) == set(tensors)
    for k, v in tensors.items():
        assert by_name[k]["shape"] == list(v.shape) and by_name[k]["parameters"] == v.numel()
        assert by_name[k]["dtype"] == str(v.dtype).replace("torch.", "")
    assert sorted(n for names in report["groups"].values() for n in names) == sorted(tensors)


@pytest.mark.parametrize("kind,layers", [("mlp", 3), ("cnn", 4), ("resnet", 3)])
def test_digits_fixtures(fixtures_dir, kind, layers):
    path = fixtures_dir / "digits" / f"{kind}_seed0.safetensors"
    report = inspect_json(path)
    assert report["family"] == kind and report["num_layers"] == layers
    _check_fields(report, load_file(path))


@pytest.mark.parametrize("kind", sorted(HF))
def test_hf_families(tmp_path, kind):
    folder = HF[kind](tmp_path / kind)
    report = inspect_json(folder)
    assert report["family"] == kind
    cfg = json.loads((folder / "config.json").read_text())
    assert report["num_layers"] == cfg.get("num_hidden_layers", cfg.get("n_layer")) == 3
    assert report["hidden_size"] == cfg.get("hidden_size", cfg.get("n_embd"))
    _check_fields(report, load_file(folder / "model.safetensors"))
    blocks = [g for g in report["groups"] if g.startswith("block ")]
    assert blocks == ["block 0", "block 1", "block 2"]


def test_parameter_count_matches_transformers_model(tmp_path):
    from transformers import LlamaForCausalLM

    folder = save_tiny_llama(tmp_path / "llama")
    model = LlamaForCausalLM.from_pretrained(folder)
    assert inspect_json(folder)["num_parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sharded_folder_written_by_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    src = HF[kind](tmp_path / "src")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="30KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    for target in (sharded, sharded / "model.safetensors.index.json"):
        report = inspect_json(target)
        assert report["family"] == kind and report["num_layers"] == 3
        assert sorted(report["files"]) == sorted(str(s) for s in shards)
        want = {}
        for s in shards:
            want.update(load_file(s))
        _check_fields(report, want)


def test_hand_built_sequential_cnn_and_pickle(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 2}, tmp_path / "cnn.pt")
    report = inspect_json(tmp_path / "cnn.pt")
    assert report["family"] == "cnn" and report["num_layers"] == 3
    assert report["family_info"]["input_shape"] == [3, 6, 6]  # 8 * 6 * 6 features after two "same" 3x3 convs
    _check_fields(report, state)


def test_unknown_family_and_custom_model(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"something": torch.zeros(3, 3, 3), "else": torch.ones(2)}, path)
    assert inspect_json(path)["family"] == "unknown"
    from tests.custom_models import TinyConvNet

    custom = tmp_path / "custom.safetensors"
    save_file(TinyConvNet().state_dict(), custom)
    report = inspect_json(custom, "--model", "tests.custom_models:tiny_convnet")
    assert report["family"] == "custom" and report["family_info"]["model"] == "tests.custom_models:tiny_convnet"


def test_provenance_and_metadata_shown(tmp_path):
    from modelsurgery.checkpoint import Provenance, plan_tensor, write_checkpoint

    src = tmp_path / "src.safetensors"
    save_file({"w": torch.ones(2)}, src, metadata={"author": "me"})
    out = tmp_path / "out.safetensors"
    write_checkpoint(out, [plan_tensor("w", torch.ones(2))], metadata={"author": "me"},
                     provenance=Provenance("copy", {"x": 1}, [src]))
    report = inspect_json(out)
    assert report["metadata"]["author"] == "me"
    assert report["provenance"]["operation"] == "copy" and report["provenance"]["parameters"] == {"x": 1}
    table = runner.invoke(app, ["inspect", str(out)])
    assert table.exit_code == 0 and "provenance" in table.stdout and "copy" in table.stdout


def test_table_output_lists_family_and_totals(fixtures_dir):
    result = runner.invoke(app, ["inspect", str(fixtures_dir / "digits" / "resnet_seed0.safetensors"), "--all"])
    assert result.exit_code == 0
    assert "resnet" in result.stdout and "layer2.0.shortcut.0.weight" in result.stdout
    n = sum(t.numel() for t in load_file(fixtures_dir / "digits" / "resnet_seed0.safetensors").values())
    assert f"{n:,} parameters" in result.stdout


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_dtype_names_and_bytes_from_the_header(tmp_path, dtype):
    """Headers are read without torch: the names and sizes must still be torch's own."""
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.zeros(3, 5).to(dtype), "b": torch.zeros(7).to(dtype)}
    save_file(tensors, path)
    report = inspect_json(path)
    _check_fields(report, tensors)
    assert report["num_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())


# ----- quantized checkpoints: shown as the model they stand for ---------------------------------------
def _quantize(src, out, fmt: str, group: int) -> None:
    r = runner.invoke(app, ["quantize", str(src), "-o", str(out), "--method", "rtn", "--bits", "4",
                            "--granularity", "group", "--group-size", str(group), "--format", fmt, "--quiet"])
    assert r.exit_code == 0, r.output


def _check_quantized(report: dict, float_report: dict, source: dict[str, torch.Tensor],
                     stored: dict[str, torch.Tensor], fmt: str, group: int, method: str | None = "rtn") -> None:
    # the underlying model: the family, layers and block groups of the float checkpoint it came from
    for key in ("family", "num_layers", "hidden_size"):
        assert report[key] == float_report[key], key
    assert list(report["groups"]) == list(float_report["groups"])
    # parameters of the float model (counted by torch on the source), bytes and tensors as stored
    assert report["num_parameters"] == sum(t.numel() for t in source.values())
    assert report["num_tensors"] == len(stored)
    assert report["num_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    layers = report["quantized_layers"]
    assert layers and all(list(source[w].shape) == layers[w]["shape"] for w in layers)
    assert all(w not in stored for w in layers)  # they are stored as codes, not as floats
    for t in report["tensors"]:
        assert (t.get("quantized_weight") in layers) == (t["name"] not in source), t["name"]
    # the scheme, in short: kept float = the float matrices copied from the source unchanged
    kept = sorted(n for n, t in stored.items() if n in source and t.is_floating_point() and t.dim() >= 2)
    assert report["scheme"] == {"format": fmt, "method": method, "bits": 4, "granularity": "group",
                                "group_size": group, "symmetric": True, "quantized_weights": len(layers),
                                "kept_float": kept}


def _stored(path) -> dict[str, torch.Tensor]:
    files = [path] if path.suffix == ".safetensors" else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kind,fmt,group", [("gpt2", "packed", 32), ("llama", "packed", 16),
                                            ("llama", "gptq", 16), ("llama", "compressed-tensors", 16)])
def test_quantized_folder_shows_family_blocks_and_scheme(fixtures_dir, tmp_path, kind, fmt, group):
    src = fixtures_dir / "charlm" / kind
    out = tmp_path / "q"
    _quantize(src, out, fmt, group)
    report = inspect_json(out)
    _check_quantized(report, inspect_json(src), load_file(src / "model.safetensors"), _stored(out), fmt, group)
    text = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert text.exit_code == 0, text.output
    assert f"family {kind}" in text.output and "block 0 (" in text.output
    assert "quantized weights" in text.output and "'layers'" not in text.output  # a table, not a dict dump
    listing = runner.invoke(app, ["inspect", str(out), "--all"], env={"COLUMNS": "200"}).output
    first = next(iter(report["quantized_layers"]))
    shape = "x".join(map(str, report["quantized_layers"][first]["shape"]))
    assert any(line.split()[:3] == [first, "│", shape] for line in listing.splitlines()), listing


def test_packed_single_file_mlp(fixtures_dir, tmp_path):
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    out = tmp_path / "q.safetensors"
    r = runner.invoke(app, ["quantize", str(src), "-o", str(out), "--method", "rtn", "--bits", "4",
                            "--format", "packed", "--quiet"])
    assert r.exit_code == 0, r.output
    report = inspect_json(out)
    assert report["family"] == "mlp" and report["num_layers"] == inspect_json(src)["num_layers"]
    source = load_file(src)
    assert report["num_parameters"] == sum(t.numel() for t in source.values())
    assert report["scheme"]["granularity"] == "channel" and report["scheme"]["group_size"] is None


def test_gptq_folder_of_another_tool_is_read_by_its_owner(fixtures_dir, tmp_path):
    """A GPTQ folder without modelsurgery's record (as other tools write it): weights read by
    modelsurgery.deploy, the scheme from config.json and the tensors."""
    src = fixtures_dir / "charlm" / "llama"
    out = tmp_path / "q"
    _quantize(src, out, "gptq", 16)
    stored = load_file(out / "model.safetensors")
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})  # drop our records
    report = inspect_json(out)
    assert report["provenance"] is None
    # the method is not recorded in a GPTQ folder
    _check_quantized(report, inspect_json(src), load_file(src / "model.safetensors"), stored, "gptq", 16, None)


def test_quantization_record_without_shapes_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    record = {"format": "packed", "method": "rtn", "bits": 4, "layers": {"w": {"bits": 4}}}
    save_file({"w.qweight": torch.zeros(2, 2, dtype=torch.uint8)}, path,
              metadata={"modelsurgery.quantization": json.dumps(record)})
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code != 0 and r.output.count("\n") == 1
    assert str(path) in r.output and "'w' has no stored shape" in r.output


def test_gguf_scheme_as_a_table(tmp_path):
    from modelsurgery.deploy import deploy
    from modelsurgery.ops.quantize.grids import QuantScheme
    from tests.deploy.conftest import rtn_source

    path = tmp_path / "m.gguf"
    deploy(rtn_source("gguf", QuantScheme(4, "group", 32, True)), path, "gguf", gguf_tokenizer="none")
    report = inspect_json(path)
    assert report["family"] == "gguf:llama" and report["scheme"]["type"] == "Q4_0"
    text = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"}).output
    rows = {tuple(line.split("│")[0].split()): line.split("│")[1].strip() for line in text.splitlines()
            if line.count("│") == 1}
    assert rows[("type",)] == "Q4_0" and rows[("group", "size")] == "32" and rows[("bits",)] == "4"


def test_quantization_key_is_the_packed_format_owners():
    from modelsurgery.ops.inspect import QUANTIZATION_KEY
    from modelsurgery.ops.quantize.packing import METADATA_KEY

    assert QUANTIZATION_KEY == METADATA_KEY


def test_tied_weights_in_a_pickle_count_once_as_transformers_counts_them(tmp_path):
    """torch.save of a GPT-2 state dict stores lm_head.weight and transformer.wte.weight as one storage (the
    tied head): the parameters and bytes count once, as transformers' num_parameters() counts the model and as
    the same model written to safetensors (without the tied name) is counted."""
    import shutil

    from transformers import GPT2LMHeadModel

    folder = save_tiny_gpt2(tmp_path / "gpt2")
    model = GPT2LMHeadModel.from_pretrained(folder)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    torch.save(state, pickled / "pytorch_model.bin")
    report = inspect_json(pickled)
    assert report["num_tensors"] == len(state)
    assert report["num_parameters"] == model.num_parameters() == inspect_json(folder)["num_parameters"]
    assert report["num_bytes"] == inspect_json(folder)["num_bytes"]
    head = next(t for t in report["tensors"] if t["name"] == "lm_head.weight")
    assert head["parameters"] == 0 and head["tied_to"] == "transformer.wte.weight"
