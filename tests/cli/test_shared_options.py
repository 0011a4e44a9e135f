"""Every command accepts every shared option (--json, --force, --quiet/-q, --debug; --max-shard-size and
--no-input-hash where a command has them), defined once in ``cli/options.py``; Typer's help does not print
``--json <bool>`` as if the flag took a value. Every command that writes a checkpoint takes the writing
options (--dtype, --max-shard-size, --no-input-hash), and each is checked for its effect on the files, read
with safetensors' own reader: float tensors in the requested dtype and equal to torch's cast of the default
output, shards and an index that together hold the default output, a provenance without digests."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from modelsurgery.cli.app import COMMANDS, app
from tests.hf_tiny import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
MLP0 = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
MLP1 = ROOT / "fixtures" / "digits" / "mlp_seed1.safetensors"
INCREMENTAL = ROOT / "fixtures" / "digits" / "incremental_clipped.safetensors"
UNIVERSAL = ["--json", "--force", "--quiet", "--debug"]
WRITE_OPTIONS = ("--dtype", "--max-shard-size", "--no-input-hash")
runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared")
    base = save_tiny_llama(root / "base")
    tuned = save_tiny_llama(root / "tuned", seed=1)
    r = runner.invoke(app, ["extract", str(base), str(tuned), "-o", str(root / "lora"), "--rank", "4", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["quantize", str(MLP0), "-o", str(root / "packed.safetensors"), "--method", "rtn",
                            "--format", "packed", "-q"])
    assert r.exit_code == 0, r.output
    (root / "recipe.yml").write_text(f"steps:\n  - name: q\n    run: quantize\n    inputs: [{MLP0}]\n"
                                     "    options: {method: rtn, bits: 4}\n")
    (root / "mergekit.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: "
                                       f"{{weight: 0.5}}\n  - model: {tuned}\n    parameters: {{weight: 0.5}}\n")
    return root


def invocations(w: Path) -> dict[str, list[str]]:
    """A small valid run of each command (output names under ``w``)."""
    return {
        "inspect": ["inspect", str(MLP0)],
        "merge": ["merge", str(MLP0), str(MLP1), "-o", str(w / "merged.safetensors")],
        "analyze": ["analyze", str(MLP0), str(MLP1)],
        "grow": ["grow", str(MLP0), "-o", str(w / "grown.safetensors"), "--method", "width"],
        "align": ["align", str(INCREMENTAL), "-o", str(w / "aligned.safetensors"), "--old-classes", "5"],
        "quantize": ["quantize", str(MLP0), "-o", str(w / "q.safetensors"), "--method", "rtn"],
        "dequantize": ["dequantize", str(w / "packed.safetensors"), "-o", str(w / "deq.safetensors")],
        "export": ["export", str(MLP0), "-o", str(w / "m.onnx")],
        "fold": ["fold", str(w / "base"), str(w / "lora"), "-o", str(w / "folded")],
        "extract": ["extract", str(w / "base"), str(w / "tuned"), "-o", str(w / "lora2"), "--rank", "2"],
        "run": ["run", str(w / "mergekit.yml"), "-o", str(w / "recipe-out")],
    }


def writing_invocations(w: Path) -> dict[str, tuple[list[str], list[Path]]]:
    """Each command that writes a checkpoint, without its output, and the input files its provenance names."""
    base = [*sorted((w / "base").glob("*.safetensors"))]
    return {
        "merge": (["merge", str(MLP0), str(MLP1), "--method", "linear"], [MLP0, MLP1]),
        "grow": (["grow", str(MLP0), "--method", "width"], [MLP0]),
        "align": (["align", str(INCREMENTAL), "--old-classes", "5"], [INCREMENTAL]),
        "quantize": (["quantize", str(MLP0), "--method", "rtn", "--format", "fake"], [MLP0]),
        "dequantize": (["dequantize", str(w / "packed.safetensors")], [w / "packed.safetensors"]),
        "fold": (["fold", str(w / "base"), str(w / "lora")], base),
        "run": (["run", str(w / "mergekit.yml")], [*base, *sorted((w / "tuned").glob("*.safetensors"))]),
    }


def _option_names(name: str) -> set[str]:
    r = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert r.exit_code == 0
    return set(re.findall(r"(--[a-z][a-z-]*|-[a-z])\b", r.output))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_the_shared_flags_without_a_value(name):
    r = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert set(UNIVERSAL) | {"-q"} <= _option_names(name)
    for flag in UNIVERSAL:
        line = next(line for line in r.output.splitlines() if f" {flag} " in line)
        assert "<bool>" not in line, line


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "demo"])  # demo: its own test, minutes long
def test_every_command_runs_with_every_shared_option(work, name):
    args = invocations(work)[name]
    extra = [o for o in ("--max-shard-size", "--no-input-hash") if o in _option_names(name)]
    values = {"--max-shard-size": ["1GB"], "--no-input-hash": []}
    for round_ in range(2):  # the second run replaces the first output: --force
        r = runner.invoke(app, [*args, *UNIVERSAL, *[x for o in extra for x in [o, *values[o]]]])
        assert r.exit_code == 0, (round_, r.output)
        json.loads(r.stdout)  # --json: one object on stdout, --quiet: no progress text in it
    r = runner.invoke(app, [*args, "-q"])  # without --force an existing output is refused
    written = name not in ("inspect", "analyze", "run")  # run: a rerun is answered from its cache
    assert (r.exit_code == 1) == written, r.output
    if written:
        assert "--force" in r.output


def test_no_input_hash_recorded(work):
    r = runner.invoke(app, ["grow", str(MLP0), "-o", str(work / "nohash.safetensors"), "--method", "width",
                            "--no-input-hash", "-q"])
    assert r.exit_code == 0, r.output
    from safetensors import safe_open

    with safe_open(work / "nohash.safetensors", "pt") as f:
        record = json.loads(f.metadata()["modelsurgery"])
    assert record["sources"] == [] and record["parameters"]["inputs_unhashed"] == [str(MLP0)]


# ----- the writing options: every command that writes a checkpoint, each option, its effect ---------------
def _writing(name: str) -> None:
    """Every writing command has every writing option (quantize included)."""
    missing = [o for o in WRITE_OPTIONS if o not in _option_names(name)]
    assert not missing, f"surgery {name} lacks {missing}"


def _write(work: Path, name: str, out: Path, *options: str) -> Path:
    args, _ = writing_invocations(work)[name]
    r = runner.invoke(app, [*args, "-o", str(out), "-q", *options])
    assert r.exit_code == 0, r.output
    return out


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Every tensor of a folder output (all its shards) and each shard's provenance record."""
    tensors, records = {}, []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            records.append(json.loads(f.metadata()["modelsurgery"]))
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert k not in tensors, f"{k} is in two shards"
                tensors[k] = f.get_tensor(k)
    return tensors, records


@pytest.fixture(scope="module")
def defaults(work):
    """Each writing command's output without writing options (written on first use)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = _write(work, name, work / f"default-{name}")
        return made[name]

    return get


@pytest.mark.parametrize("name", list(writing_invocations(Path("."))))
def test_writing_commands_take_the_writing_options(name):
    _writing(name)


@pytest.mark.parametrize("dtype", ["bfloat16", "fp16"])
@pytest.mark.parametrize("name", list(writing_invocations(Path("."))))
def test_dtype_writes_every_float_tensor_in_it(work, defaults, tmp_path, name, dtype):
    _writing(name)
    want = {"bfloat16": torch.bfloat16, "fp16": torch.float16}[dtype]
    ref, _ = read_folder(defaults(name))
    got, records = read_folder(_write(work, name, tmp_path / "out", "--dtype", dtype))
    assert set(got) == set(ref)
    assert any(t.is_floating_point() for t in ref.values())
    for k, t in ref.items():
        if t.is_floating_point():
            assert got[k].dtype == want, k
            if name != "quantize":  # quantize: its own test owns where the grid meets the cast
                assert torch.equal(got[k], t.to(want)), k  # computed as before, rounded once by the cast
        else:
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert all(r["parameters"]["dtype"] == {"fp16": "float16"}.get(dtype, dtype) for r in records)
    config = tmp_path / "out" / "config.json"
    if config.exists():  # transformers reads the dtype to load in from config.json
        cfg = json.loads(config.read_text())
        assert {cfg.get(k) for k in ("torch_dtype", "dtype")} - {None} == {str(want).removeprefix("torch.")}


def test_dtype_folder_loads_in_transformers_as_that_dtype(work, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _write(work, "fold", tmp_path / "folded", "--dtype", "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", list(writing_invocations(Path("."))))
def test_max_shard_size_shards_the_folder(work, defaults, tmp_path, name):
    _writing(name)
    ref, _ = read_folder(defaults(name))
    limit = 20_000
    out = _write(work, name, tmp_path / "out", "--max-shard-size", "20KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2, [p.name for p in shards]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref) and set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]  # noqa: SIM118
        assert sum(sizes) <= limit or len(sizes) == 1, (shard.name, sizes)  # a bigger tensor sits alone
    got, _ = read_folder(out)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", list(writing_invocations(Path("."))))
def test_no_input_hash_records_paths_without_digests(work, defaults, tmp_path, name):
    _writing(name)
    _, inputs = writing_invocations(work)[name]
    _, records = read_folder(defaults(name))
    hashed = {Path(s["file"]).resolve(): s["sha256"] for s in records[0]["sources"]}
    for path in inputs:  # the default records each input's SHA-256, computed here by hashlib
        assert hashed[path.resolve()] == hashlib.sha256(path.read_bytes()).hexdigest(), path
    _, records = read_folder(_write(work, name, tmp_path / "out", "--no-input-hash"))
    for record in records:
        assert record["sources"] == []
        unhashed = {Path(p).resolve() for p in record["parameters"]["inputs_unhashed"]}
        assert {p.resolve() for p in inputs} <= unhashed


@pytest.mark.parametrize("name", list(writing_invocations(Path("."))))
def test_bad_dtype_refused_in_one_line_nothing_written(work, tmp_path, name):
    _writing(name)
    args, _ = writing_invocations(work)[name]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "out"), "-q", "--dtype", "int8"])
    assert r.exit_code == 1
    assert "--dtype int8" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_writing_options_belong_to_a_mergekit_config(work, tmp_path):
    r = runner.invoke(app, ["run", str(work / "recipe.yml"), "-o", str(tmp_path / "build"), "--dtype", "bf16"])
    assert r.exit_code == 1 and "in each step's options" in r.stderr, r.output
    config = tmp_path / "out16.yml"
    config.write_text((work / "mergekit.yml").read_text() + "out_dtype: float16\n")
    r = runner.invoke(app, ["run", str(config), "-o", str(tmp_path / "merged"), "--dtype", "bfloat16"])
    assert r.exit_code == 1 and "out_dtype: float16" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out16.yml"]
    r = runner.invoke(app, ["run", str(config), "-o", str(tmp_path / "merged"), "--dtype", "float16", "-q"])
    assert r.exit_code == 0, r.output  # the same dtype twice agrees
    got, _ = read_folder(tmp_path / "merged")
    assert {t.dtype for t in got.values()} == {torch.float16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text()).get("dtype") == "float16"


def test_dtype_refuses_float8_tensors_nothing_written(tmp_path):
    """float8 values are quantized codes whose scales live elsewhere: a cast would not apply them."""
    from modelsurgery.checkpoint import plan_tensor, write_checkpoint
    from modelsurgery.errors import SurgeryError

    codes = torch.ones(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(SurgeryError, match="'w' is float8_e4m3fn"):
        write_checkpoint(tmp_path / "out.safetensors", [plan_tensor("w", codes)], dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []
    write_checkpoint(tmp_path / "out.safetensors", [plan_tensor("w", codes)])  # without --dtype: kept as it is
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.get_tensor("w").dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_prints_no_flag_as_taking_a_value(name):
    """Every flag (a command's own ones such as grow --split, merge --repair, the --x/--no-x pairs, --help and
    the root --version), not only the shared ones: click parses them without a value, so `<bool>` beside one
    tells the reader to write `--split true`, which click refuses."""
    r = runner.invoke(app, [name, "--help"] if name else ["--help"], terminal_width=200)
    assert r.exit_code == 0
    assert "<bool>" not in r.output, [line for line in r.output.splitlines() if "<bool>" in line]
