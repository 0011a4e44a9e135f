"""`surgery quantize` through the CLI: --json is one object, errors are one line with exit 1, help has examples."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from modelsurgery.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
CALIB = ROOT / "fixtures" / "data" / "digits_calib.safetensors"
EVAL = ROOT / "fixtures" / "data" / "digits_eval.safetensors"
runner = CliRunner()


def test_json_output_and_inspect(tmp_path):
    out = tmp_path / "q.safetensors"
    r = runner.invoke(app, ["quantize", str(MLP), "-o", str(out), "--bits", "4", "--method", "flexround",
                            "--calib", str(CALIB), "--samples", "64", "--steps", "10", "--format", "packed",
                            "--eval", str(EVAL), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["options"]["method"] == "flexround" and report["options"]["bits"] == 4
    assert set(report["layers"]) == {"0.weight", "2.weight"} and report["skipped"] == ["4.weight"]
    assert 0 < report["evaluation"]["quantized"]["accuracy"] <= 1
    assert report["bytes_out"] < report["bytes_in"]
    shown = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert shown["quantization"]["format"] == "packed" and shown["quantization"]["bits"] == 4
    assert "0.weight.qweight" in [t["name"] for t in shown["tensors"]]


def test_default_method_is_flexround_signsgd_at_autorounds_settings(tmp_path):
    """No --method: flexround-signsgd (the method that leads bench_quantize_peers.py, README), at its declared
    200 steps and batch 8 unless given (here --steps 5), with the steps and preset in the provenance."""
    out = tmp_path / "q.safetensors"
    r = runner.invoke(app, ["quantize", str(MLP), "-o", str(out), "--calib", str(CALIB), "--samples", "32",
                            "--steps", "5", "--json"])
    assert r.exit_code == 0, r.output
    options = json.loads(r.stdout)["options"]
    assert (options["method"], options["steps"], options["batch_size"], options["preset"]) == (
        "flexround-signsgd", 5, 8, "default")


def test_human_output(tmp_path):
    r = runner.invoke(app, ["quantize", str(MLP), "-o", str(tmp_path / "q.safetensors"), "--method", "rtn",
                            "--bits", "3", "--calib", str(CALIB), "--eval", str(EVAL), "--no-default-skips"])
    assert r.exit_code == 0, r.output
    assert "rtn 3-bit channel symmetric, 3 weights quantized" in " ".join(r.stdout.split())
    assert "accuracy" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--bits", "12", "--method", "rtn"], "error: --bits 12: expected a bit width from 2 to 8"),
    (["--method", "rtn", "--granularity", "group", "--group-size", "5"], "does not divide its row length 64"),
    (["--calib", "missing.txt"], "missing.txt: no such file"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "q.safetensors"
    r = runner.invoke(app, ["quantize", str(MLP), "-o", str(out), *args])
    assert r.exit_code == 1
    assert message in " ".join(r.stderr.split())
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_help_has_examples():
    r = runner.invoke(app, ["quantize", "--help"])
    assert r.exit_code == 0
    for text in ("--calib", "--granularity", "--format", "Examples", "--no-default-skips"):
        assert text in r.stdout


@pytest.mark.slow
def test_demo_step(tmp_path):
    from modelsurgery.cli.quantize import demo_step

    result = demo_step(ROOT / "fixtures", tmp_path, quiet=True)
    assert set(result) == {"rtn", "flexround"}
    assert result["flexround"]["output_cosine"] > result["rtn"]["output_cosine"]


@pytest.mark.parametrize("method", ["flexround", "adaround"])
def test_fast_mode_gives_the_same_weights(tmp_path, method):
    """--fast only skips the allocator handling of --low-memory: the learned weights are identical."""
    from safetensors.torch import load_file

    outs = []
    for mode in ("--low-memory", "--fast"):
        out = tmp_path / f"{mode[2:]}.safetensors"
        r = runner.invoke(app, ["quantize", str(MLP), "-o", str(out), "--bits", "3", "--method", method,
                                "--calib", str(CALIB), "--samples", "64", "--steps", "20", "--batch-size", "16",
                                mode, "--quiet"])
        assert r.exit_code == 0, r.output
        outs.append(load_file(out))
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        assert outs[0][name].equal(outs[1][name]), name


def _provenance(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["modelsurgery"])["parameters"]


def test_method_flags_come_from_the_declaration_and_reach_the_provenance(tmp_path):
    """Flags left out take the method's declared default (AdaRound: AIMET's), given ones are used, and
    the output's provenance records every value used."""
    from modelsurgery.ops.quantize.adaround import AdaRoundQuantizer

    out = tmp_path / "a.safetensors"
    r = runner.invoke(app, ["quantize", str(MLP), "-o", str(out), "--method", "adaround", "--calib", str(CALIB),
                            "--samples", "64", "--steps", "4", "--reg-weight", "0.05", "--json"])
    assert r.exit_code == 0, r.output
    used = _provenance(out)["params"]
    assert used == {**AdaRoundQuantizer.resolve(), "steps": 4, "reg_weight": 0.05}
    assert used["beta_start"] == 20.0 and used["warmup"] == 0.2 and used["batch_size"] == 32
    assert json.loads(r.stdout)["options"]["reg_weight"] == 0.05
    help_text = " ".join(runner.invoke(app, ["quantize", "--help"]).stdout.replace("│", " ").split())
    for flag in ("--steps", "--lr", "--batch-size", "--reg-weight", "--beta-start", "--beta-end", "--warmup"):
        assert flag in help_text
    assert "adaround: 10000" in help_text and "flexround: 5000" in help_text


@pytest.mark.parametrize("args,message", [
    (["--method", "flexround", "--reg-weight", "0.1"],
     "error: --reg-weight: not a parameter of --method flexround (its parameters: --steps, --lr, --batch-size)"),
    (["--method", "rtn", "--steps", "100"], "error: --steps: not a parameter of --method rtn"),
    (["--method", "adaround", "--warmup", "1.5"], "error: --warmup 1.5: must be at most 1.0"),
    (["--method", "adaround", "--steps", "-3"], "error: --steps -3: must be at least 0"),
])
def test_method_flags_that_do_not_apply_are_refused(tmp_path, args, message):
    out = tmp_path / "q.safetensors"
    r = runner.invoke(app, ["quantize", str(MLP), "-o", str(out), "--calib", str(CALIB), *args])
    assert r.exit_code == 1
    assert message in " ".join(r.stderr.split())
    assert list(tmp_path.iterdir()) == []


def test_block_labels_are_the_blocks_own_prefix(tmp_path):
    """A GPT-2 block holds attention and MLP weights: its label is its own prefix (transformer.h.i.*), not its
    first weight's (transformer.h.i.attn.*)."""
    r = runner.invoke(app, ["quantize", str(ROOT / "fixtures" / "charlm" / "gpt2"), "-o", str(tmp_path / "g"),
                            "--method", "rtn", "--calib", str(ROOT / "fixtures" / "data" / "charlm_calib.txt"),
                            "--samples", "4", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    blocks = json.loads(r.stdout)["blocks"]
    assert [b["label"] for b in blocks] == [f"transformer.h.{i}.*" for i in range(4)]
    assert {w.split(".")[3] for w in blocks[0]["weights"]} == {"attn", "mlp"}


def test_kept_float_counts_every_float_weight_matrix_left_float(tmp_path):
    """A BertModel saved by transformers: its pooler is no weight of the encoder that quantize runs, the three
    embedding tables are default skips; every 2-D float tensor of the file is either quantized or listed."""
    from safetensors import safe_open

    from tests.hf_tiny import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "bert")
    with safe_open(str(bert / "model.safetensors"), "pt") as f:
        matrices = {k for k in f.keys() if len(f.get_slice(k).get_shape()) == 2}  # noqa: SIM118
    r = runner.invoke(app, ["quantize", str(bert), "-o", str(tmp_path / "q"), "--method", "rtn", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    kept = {e["name"]: e["reason"] for e in report["kept_float"]}
    assert set(kept) | set(report["layers"]) == matrices and not set(kept) & set(report["layers"])
    assert kept["pooler.dense.weight"].startswith("not a Linear, Conv or Embedding weight of the bert")
    assert {k for k, v in kept.items() if v == "embedding: default skip"} == {
        f"embeddings.{e}_embeddings.weight" for e in ("word", "position", "token_type")}
    r = runner.invoke(app, ["quantize", str(bert), "-o", str(tmp_path / "q2"), "--method", "rtn",
                            "--skip", "encoder.layer.0.*"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "12 weights quantized, 10 kept float" in text  # 6 Linear in each of the 2 other blocks; 6 + 3 + 1
    assert "(--skip encoder.layer.0.*)" in text and "pooler.dense.weight (not a Linear" in text


def test_writing_options(tmp_path):
    """--dtype bfloat16 writes torch's cast of the float32 fake output (the grid is applied in float32, then
    rounded once); --max-shard-size shards a folder; --no-input-hash records the input without a digest."""
    from safetensors import safe_open

    gpt2 = ROOT / "fixtures" / "charlm" / "gpt2"
    base = ["quantize", str(gpt2), "--method", "rtn", "--bits", "3", "-q"]
    assert runner.invoke(app, [*base, "-o", str(tmp_path / "f32")]).exit_code == 0
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "bf16"), "--dtype", "bfloat16", "--max-shard-size", "300KB",
                            "--no-input-hash"])
    assert r.exit_code == 0, r.output

    def read(folder):
        tensors, records = {}, []
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                records.append(json.loads(f.metadata()["modelsurgery"]))
                tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        return tensors, records

    ref, _ = read(tmp_path / "f32")
    got, records = read(tmp_path / "bf16")
    assert len(records) > 1 and (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    assert got.keys() == ref.keys()
    for k, t in ref.items():
        assert torch.equal(got[k], t.to(torch.bfloat16) if t.is_floating_point() else t), k
    for rec in records:
        assert rec["sources"] == [] and rec["parameters"]["inputs_unhashed"] == [str(gpt2 / "model.safetensors")]
        assert rec["parameters"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("args,message", [
    (["--format", "packed", "--dtype", "float16"], "error: --dtype float16: only for --format fake"),
    (["--format", "gptq", "--no-input-hash"], "error: --no-input-hash: not available with --format gptq"),
    (["--format", "compressed-tensors", "--max-shard-size", "1MB"],
     "error: --max-shard-size: not available with --format compressed-tensors"),
    (["--dtype", "int8"], "error: --dtype int8: expected float32, float16 or bfloat16"),
    (["--max-shard-size", "lots"], "error: max shard size 'lots': expected a size"),
])
def test_writing_options_refused_in_one_line(tmp_path, args, message):
    r = runner.invoke(app, ["quantize", str(ROOT / "fixtures" / "charlm" / "gpt2"), "-o", str(tmp_path / "q"),
                            "--method", "rtn", *args])
    assert r.exit_code == 1, r.output
    assert message in " ".join(r.stderr.split()) and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_skip_that_names_no_weight_is_reported(tmp_path):
    """--skip lm_head on a model whose head is tied to its embedding keeps nothing float: transformers computes the
    head with the quantized embedding. The report says so instead of passing over it."""
    from safetensors.torch import load_file

    from tests.hf_tiny import load_hf, save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama", tie_word_embeddings=True)
    out = tmp_path / "q"
    args = ["quantize", str(folder), "--method", "rtn", "--no-default-skips", "--skip", "lm_head"]
    r = runner.invoke(app, [*args, "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "--skip lm_head matched no Linear, Conv or Embedding weight" in " ".join(r.output.split())
    head = load_hf(out).lm_head.weight
    assert torch.equal(head, load_file(out / "model.safetensors")["model.embed_tokens.weight"])
    assert not torch.equal(head, load_file(folder / "model.safetensors")["model.embed_tokens.weight"])
    report = json.loads(runner.invoke(app, [*args, "-o", str(tmp_path / "q2"), "--json"]).stdout)
    assert report["skip_unmatched"] == ["lm_head"]
    kept = json.loads(runner.invoke(app, [*args[:-1], "embed_tokens", "-o", str(tmp_path / "q3"), "--json"]).stdout)
    assert kept["skip_unmatched"] == []


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "16"], "error: --seq-len 16: it cuts calibration and evaluation samples, and without --calib or "
                          "--eval there are none"),
    (["--seq-len", "16", "--calib", str(CALIB)],
     f"error: --seq-len 16: it cuts token samples, and {CALIB} holds feature inputs, not token ids"),
    (["--samples", "64"], "error: --samples 64: it counts calibration samples, and without --calib there are none"),
    (["--batch-size", "8"], "error: --batch-size 8: it batches calibration samples, and without --calib there are "
                            "none"),
    (["--seed", "1", "--calib", str(CALIB)], "error: --seed 1: it orders the batches a learned method trains on; "
                                             "--method rtn trains nothing"),
    (["--fast"], "error: --fast: it applies while a learned method trains a block; --method rtn trains nothing"),
])
def test_options_nothing_reads_refused(tmp_path, args, message):
    """--seq-len cuts token samples (none in the digits' feature inputs, or without data), --samples and
    --batch-size the calibration set, --seed and --fast the training: where nothing reads them they are refused."""
    r = runner.invoke(app, ["quantize", str(MLP), "-o", str(tmp_path / "q.safetensors"), "--method", "rtn", *args])
    assert r.exit_code == 1
    assert r.stderr.strip() == message
    assert list(tmp_path.iterdir()) == []


def test_seq_len_in_a_recipe_as_on_the_command_line(tmp_path):
    """A recipe's quantize step passes seq_len as the command line does: refused for the digits MLP, recorded
    for token data."""
    from safetensors import safe_open

    from tests.hf_tiny import save_tiny_llama

    llama = save_tiny_llama(tmp_path / "llama")
    step = "steps:\n  - {{name: q, run: quantize, inputs: [{model}], options: {{method: rtn, calib: {calib}, " \
           "seq_len: 16}}}}\n"
    recipe = tmp_path / "mlp.yml"
    recipe.write_text(step.format(model=MLP, calib=CALIB))
    r = runner.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "mlp")])
    assert r.exit_code == 1 and "step 'q' (quantize) failed" in r.stderr and "--seq-len 16: it cuts token" in r.stderr
    assert not (tmp_path / "mlp").exists()
    torch.save({"input_ids": torch.randint(3, 97, (4, 24))}, tmp_path / "ids.pt")
    recipe.write_text(step.format(model=llama, calib=tmp_path / "ids.pt"))
    r = runner.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "llama-q")])
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "llama-q" / "q" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["modelsurgery"])["parameters"]["seq_len"] == 16
