"""Startup: `surgery --help` and `--version` import no subcommand module (so neither torch nor onnx),
`surgery inspect` of a safetensors checkpoint imports no torch (families describe without it), and the
summary `--help` lists for each command is the start of that command's own docstring."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from modelsurgery.cli.app import COMMANDS, app


@pytest.mark.parametrize("args", [["--help"], ["--version"], []])
def test_root_imports_nothing_heavy(args):
    roots, prefixes = ("torch", "onnx", "onnxruntime", "transformers", "numpy"), ("modelsurgery.ops",
                                                                                   "modelsurgery.checkpoint")
    code = (f"import sys\nfrom modelsurgery.cli.app import main\nsys.argv = ['surgery', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r} or m.startswith({prefixes!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", f"imported at startup: {r.stdout[-500:]}"


def test_listing_matches_each_command_docstring():
    for name, (module, function, summary) in COMMANDS.items():
        doc = " ".join((getattr(importlib.import_module(f"modelsurgery.cli.{module}"), function).__doc__ or "").split())
        assert doc.startswith(summary), name


def test_every_command_runs_its_own_help():
    runner = CliRunner()
    listing = runner.invoke(app, ["--help"]).output
    for name in COMMANDS:
        assert name in listing
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, name


def _modules_after(code: str) -> list[str]:
    """The heavy modules (torch, numpy...) a fresh interpreter holds after running ``code``."""
    roots = ("torch", "onnx", "onnxruntime", "transformers", "numpy")
    probe = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r}))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return eval(r.stdout.strip().splitlines()[-1])  # a printed list of module names


def test_safetensors_header_reader_needs_no_torch(tmp_path):
    """formats.py reads and validates a header with dtype names; torch only when a value is read."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4, dtype=torch.int8)}, path)
    code = ("from pathlib import Path\nfrom modelsurgery.checkpoint import read_safetensors_header\n"
            f"infos, _ = read_safetensors_header(Path({str(path)!r}))\n"
            "print([(i.name, i.shape, i.dtype_name, i.nbytes) for i in infos.values()])")
    assert _modules_after(code) == []
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert eval(r.stdout.strip().splitlines()[0]) == [("a", (2, 3), "bfloat16", 12), ("b", (4,), "int8", 4)]


def test_hashing_the_named_inputs_needs_no_torch(fixtures_dir):
    """The CLI starts hashing a writing command's inputs before the command's module (and torch) is
    imported: finding and hashing them imports none of the heavy modules."""
    model = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    code = ("from modelsurgery.checkpoint import digests\nfrom modelsurgery.cli.app import prefetch_input_digests\n"
            f"files = prefetch_input_digests('quantize', [{str(model)!r}, '-o', 'out'])\n"
            "assert len(files) == 1 and digests.file_digest(files[0])")
    assert _modules_after(code) == []


def test_families_describe_without_torch():
    """The rule of families/base.py: a family file describes (detection, blocks, roles, config.json) and
    imports no torch; the torch modules live in families/modules/ and are imported by build_module."""
    code = ("from modelsurgery.families import registered\nimport modelsurgery.families.rope\n"
            "print(sorted(registered()))")
    assert _modules_after(code) == []


def test_writer_names_still_importable_from_the_package():
    from modelsurgery import checkpoint
    from modelsurgery.checkpoint import writer

    assert all(getattr(checkpoint, name) is getattr(writer, name) for name in checkpoint._WRITER_NAMES)
    assert set(checkpoint._WRITER_NAMES) <= set(checkpoint.__all__)
    with pytest.raises(AttributeError):
        checkpoint.no_such_name  # noqa: B018


def _inspect_each(paths: list, *extra: str) -> str:
    """Code that runs ``surgery inspect PATH *extra`` for each path in one fresh interpreter."""
    return ("import sys\nfrom modelsurgery.cli.app import main\n"
            f"for path in {[str(p) for p in paths]!r}:\n"
            f"    sys.argv = ['surgery', 'inspect', path, *{list(extra)!r}]\n"
            "    try:\n        main()\n    except SystemExit as e:\n        assert not e.code, (path, e.code)")


@pytest.mark.parametrize("extra", [["--json"], ["--all"]])
def test_inspect_of_safetensors_imports_no_torch(fixtures_dir, tmp_path, extra):
    """Every family's detection, blocks and features (each decoder layout's from its config.json), and a
    packed checkpoint's scheme table, answered from headers with neither torch nor onnx nor transformers."""
    from tests.hf_tiny import DECODER_FAMILY, save_tiny_bert, save_tiny_decoder

    paths = [fixtures_dir / "digits" / f"{kind}_seed0.safetensors" for kind in ("mlp", "cnn", "resnet")]
    paths += [fixtures_dir / "charlm" / "gpt2", fixtures_dir / "charlm" / "llama",
              save_tiny_bert(tmp_path / "bert")]
    paths += [save_tiny_decoder(kind, tmp_path / kind) for kind in DECODER_FAMILY]
    packed = tmp_path / "packed"
    r = CliRunner().invoke(app, ["quantize", str(fixtures_dir / "charlm" / "llama"), "-o", str(packed), "--method",
                                 "rtn", "--bits", "4", "--format", "packed", "--quiet"])
    assert r.exit_code == 0, r.output
    paths.append(packed)
    assert _modules_after(_inspect_each(paths, *extra)) == []
    # and the answers are the ones given with torch loaded: families, features, the scheme
    out = subprocess.run([sys.executable, "-c", _inspect_each(paths, "--json")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    reports, decoder, at = [], json.JSONDecoder(), 0
    while out.stdout[at:].strip():
        report, at = decoder.raw_decode(out.stdout, at + len(out.stdout[at:]) - len(out.stdout[at:].lstrip()))
        reports.append(report)
    families = [rep["family"] for rep in reports]
    assert families == ["mlp", "cnn", "resnet", "gpt2", "llama", "bert", *DECODER_FAMILY.values(), "llama"]
    assert reports[-1]["scheme"]["format"] == "packed" and reports[-1]["scheme"]["quantized_weights"] > 0
    for path, report in zip(paths, reports):
        assert report == json.loads(CliRunner().invoke(app, ["inspect", str(path), "--json"]).output), path


def test_inspect_spells_the_packed_record_as_its_owner_does():
    """ops/inspect.py reads the packed format's record without importing ops.quantize (torch): its key,
    part suffixes and record reader are the owner's (ops/quantize/packing.py)."""
    from modelsurgery.errors import SurgeryError
    from modelsurgery.ops import inspect
    from modelsurgery.ops.quantize import packing

    assert inspect.QUANTIZATION_KEY == packing.METADATA_KEY
    assert inspect.PACKED_SUFFIXES == packing.SUFFIXES
    key = packing.METADATA_KEY
    for metadata in ({}, {key: ""}, {key: '{"layers": {"w.weight": {"shape": [2, 2]}}, "bits": 4}'},
                     {key: "not json"}, {key: "[1, 2]"}, {key: '{"layers": []}'}):
        try:
            ours = inspect.read_record(metadata, "m.safetensors")
        except SurgeryError as e:
            ours = str(e)
        try:
            theirs = packing.read_scheme(metadata, "m.safetensors")
        except SurgeryError as e:
            theirs = str(e)
        assert ours == theirs, metadata
