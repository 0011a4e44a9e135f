"""Quantized inputs to merge, analyze, grow and align (issue 11, item 2): dequantized and reported
as float, or refused in one line naming the file; never quantization metadata on changed weights.
The expected merge is computed from the packed format's own reader (``ops.quantize.packing``)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.cli.app import app
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.align import AlignOptions, align_checkpoint
from modelsurgery.ops.analyze import AnalyzeOptions, analyze_pair
from modelsurgery.ops.grow import GrowOptions, grow
from modelsurgery.ops.merge.merge import MergeOptions, merge_checkpoints
from modelsurgery.ops.quantize.operation import QuantizeOptions, quantize_checkpoint
from modelsurgery.ops.quantize.packing import METADATA_KEY, dequantize_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def quantized(fixtures_dir, tmp_path_factory):
    """The digits MLPs of seeds 0 and 1, RTN 4-bit per channel, packed and fake-quantized."""
    root = tmp_path_factory.mktemp("q")
    out = {}
    for fmt in ("packed", "fake"):
        for seed in (0, 1):
            p = root / f"{fmt}{seed}.safetensors"
            quantize_checkpoint(fixtures_dir / "digits" / f"mlp_seed{seed}.safetensors", p,
                                QuantizeOptions(bits=4, method="rtn", format=fmt))
            out[fmt, seed] = p
    return out


def test_merging_packed_checkpoints_dequantizes_and_writes_float(quantized, fixtures_dir, tmp_path):
    a, b = quantized["packed", 0], quantized["packed", 1]
    out = tmp_path / "m.safetensors"
    r = merge_checkpoints([a, b], out, MergeOptions(method="linear"))
    got = Checkpoint.open(out)
    assert METADATA_KEY not in got.metadata
    fa, fb = (dequantize_checkpoint(Checkpoint.open(p)) for p in (a, b))
    # the float model's names (no .qweight/.scale/.zero_point), in its order
    assert got.keys() == Checkpoint.open(fixtures_dir / "digits" / "mlp_seed0.safetensors").keys()
    for k in fa:
        assert got.get(k).dtype == torch.float32
        torch.testing.assert_close(got.get(k), (fa[k] + fb[k]) / 2)
    assert len(r.notes) == 2 and all("dequantized to float32 for merge" in n for n in r.notes)
    prov = json.loads(got.metadata["modelsurgery"])["parameters"]
    assert prov["float_inputs"] == r.notes


def test_merging_fake_quantized_checkpoints_drops_the_quantization_record(quantized, tmp_path):
    out = tmp_path / "m.safetensors"
    r = merge_checkpoints([quantized["fake", 0], quantized["fake", 1]], out, MergeOptions(method="linear"))
    assert METADATA_KEY not in Checkpoint.open(out).metadata  # the averages are off the 4-bit grid
    assert all("output is a float checkpoint without quantization metadata" in n for n in r.notes)


def test_packed_and_float_merge_with_matching(quantized, fixtures_dir, tmp_path):
    out = tmp_path / "m.safetensors"
    r = merge_checkpoints([quantized["packed", 0], fixtures_dir / "digits" / "mlp_seed1.safetensors"], out,
                          MergeOptions())
    assert r.matching and len(r.notes) == 1 and METADATA_KEY not in Checkpoint.open(out).metadata


def test_analyze_packed_reads_the_dequantized_weights(quantized):
    a, b = quantized["packed", 0], quantized["packed", 1]
    r = analyze_pair(a, b, AnalyzeOptions(top_k=2))
    fa, fb = (dequantize_checkpoint(Checkpoint.open(p)) for p in (a, b))
    first = r.layers[0]
    assert first.distance_before == pytest.approx(float((fa[first.name] - fb[first.name]).norm()), rel=1e-5)
    assert len(r.notes) == 2


@pytest.mark.parametrize("fmt", ["packed", "fake"])
def test_grow_and_align_refuse_quantized_input_in_one_line(quantized, tmp_path, fmt):
    src = quantized[fmt, 0]
    out = tmp_path / "o.safetensors"
    with pytest.raises(SurgeryError, match=f"{src.name}: {fmt} 4-bit quantized checkpoint \\(rtn\\); grow works "
                                           "on float weights"):
        grow([src], out, GrowOptions(method="width", factor=2.0))
    with pytest.raises(SurgeryError, match="align works on float weights"):
        align_checkpoint(src, out, AlignOptions(old_classes=5))
    assert list(tmp_path.iterdir()) == []


def test_foreign_quantized_checkpoints_are_refused(tmp_path, fixtures_dir):
    gptq = tmp_path / "gptq.safetensors"
    save_file({"0.qweight": torch.zeros(8, 16, dtype=torch.int32), "0.qzeros": torch.zeros(1, 2, dtype=torch.int32),
               "0.scales": torch.ones(1, 16)}, str(gptq))
    out = tmp_path / "m.safetensors"
    with pytest.raises(SurgeryError, match="gptq.safetensors: quantized checkpoint \\(tensor '0.qzeros' is a packed "
                                           "weight of another tool \\(GPTQ/AWQ\\)\\); merge needs float weights"):
        merge_checkpoints([gptq, gptq], out, MergeOptions(method="linear"))
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(SurgeryError, match="quantization_config: awq"):
        merge_checkpoints([folder, folder], out, MergeOptions(method="linear"))
    assert not out.exists()


def test_cli_says_the_output_is_float_or_refuses_in_one_line(quantized, tmp_path):
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", str(quantized["packed", 0]), str(quantized["packed", 1]), "-o", str(out),
                            "--method", "linear"])
    assert r.exit_code == 0, r.output
    assert "dequantized to float32 for merge; the output is a float checkpoint" in r.output
    r = runner.invoke(app, ["grow", str(quantized["packed", 0]), "-o", str(tmp_path / "g.safetensors"),
                            "--method", "width", "--factor", "2"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "grow works on float weights" in r.output


def test_fake_quantized_pickle_is_read_as_float(quantized, tmp_path):
    """A checkpoint held in memory (a .pt pickle) keeps its tensors in the float view."""
    from modelsurgery.ops.float_input import float_view

    ckpt = Checkpoint.open(quantized["fake", 0])
    pt = tmp_path / "fake.pt"
    torch.save(ckpt.state_dict(), pt)
    mem = Checkpoint.from_state_dict(ckpt.state_dict(), pt, metadata=ckpt.metadata)
    view, note = float_view(mem, "merge")
    assert note and METADATA_KEY not in view.metadata and METADATA_KEY in mem.metadata
    for k in ckpt:
        torch.testing.assert_close(view.get(k), ckpt.get(k))


@pytest.mark.parametrize("kind", ["packed", "fake", "awq"])
def test_grow_refusal_names_a_way_out_that_works(quantized, tmp_path, kind):
    """The refusal's hint must be one the user can follow: `surgery dequantize` only where dequantize takes the
    input (packed; README: dequantize takes packed, GPTQ and compressed-tensors checkpoints). It refuses a fake
    checkpoint ("its weights are already float") and an AWQ one, so naming it there sent the user in a circle."""
    if kind == "awq":
        src = tmp_path / "awq"
        src.mkdir()
        save_file({"0.weight": torch.ones(2, 2)}, str(src / "model.safetensors"))
        (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4}}))
    else:
        src = quantized[kind, 0]
    r = runner.invoke(app, ["grow", str(src), "-o", str(tmp_path / "g.safetensors"), "--method", "width"])
    assert r.exit_code == 1 and "grow works on float weights" in r.output, r.output
    follow = runner.invoke(app, ["dequantize", str(src), "-o", str(tmp_path / "d.safetensors")])
    assert ("`surgery dequantize` gives it" in r.output) == (follow.exit_code == 0), (r.output, follow.output)


def _dequantized_floats(quantized, tmp_path):
    """The packed pair as float safetensors files, dequantized by the packed format's own reader."""
    out = []
    for seed in (0, 1):
        p = tmp_path / f"float{seed}.safetensors"
        save_file(dequantize_checkpoint(Checkpoint.open(quantized["packed", seed])), str(p))
        out.append(p)
    return out


def test_matching_packed_inputs_merges_the_bytes_of_their_float_models(quantized, tmp_path):
    """Weight matching on packed inputs (each weight dequantized once, to a temporary file) finds the same
    permutations and writes the same bytes as merging the float checkpoints they stand for."""
    packed = tmp_path / "packed.safetensors"
    floats = tmp_path / "floats.safetensors"
    r_packed = merge_checkpoints([quantized["packed", 0], quantized["packed", 1]], packed, MergeOptions())
    r_float = merge_checkpoints(_dequantized_floats(quantized, tmp_path), floats, MergeOptions())
    assert r_packed.matching == r_float.matching and r_packed.matching[0]["objective_after"] > \
        r_packed.matching[0]["objective_before"]  # really permuted
    got, want = Checkpoint.open(packed), Checkpoint.open(floats)
    assert sorted(got.keys()) == sorted(want.keys())
    for k in want:
        assert got.get(k).dtype == want.get(k).dtype and torch.equal(got.get(k), want.get(k)), k


def test_each_packed_weight_is_dequantized_once_by_match_and_analyze(quantized, monkeypatch):
    """Weight matching looks every weight up in every round; a packed weight is dequantized at its first lookup
    only (before: merge dequantized the whole model up front and again to write it; analyze at every lookup)."""
    import modelsurgery.ops.float_input as float_input

    reads: dict[str, int] = {}
    real = float_input.read_packed_weight

    def counted(ckpt, name, layer):
        reads[f"{ckpt.path.name}:{name}"] = reads.get(f"{ckpt.path.name}:{name}", 0) + 1
        return real(ckpt, name, layer)

    monkeypatch.setattr(float_input, "read_packed_weight", counted)
    a, b = quantized["packed", 0], quantized["packed", 1]
    out = a.parent / "once.safetensors"
    r = merge_checkpoints([a, b], out, MergeOptions(), force=True)
    assert r.matching[0]["iterations"] > 1  # several rounds of lookups
    layers = json.loads(Checkpoint.open(a).metadata[METADATA_KEY])["layers"]
    assert reads == {f"{p.name}:{n}": 1 for p in (a, b) for n in layers}
    reads.clear()
    analyze_pair(a, b, AnalyzeOptions(top_k=2))
    assert reads and set(reads.values()) == {1}, reads


def test_no_room_for_the_dequantized_weights_is_one_line_naming_the_input(quantized, tmp_path):
    """A temporary folder without room for a dequantized weight fails in one line naming the input, the weight and
    TMPDIR (not a SIGBUS when a mapped page is written). The lack of room is real: the child's file size limit."""
    import subprocess
    import sys

    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))\n"
            "from modelsurgery.cli.app import main\n"
            "sys.argv = ['surgery', *sys.argv[1:]]\n"
            "main()\n")
    a, b = quantized["packed", 0], quantized["packed", 1]
    r = subprocess.run([sys.executable, "-c", code, "analyze", str(a), str(b)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{a}: no room for packed weight '0.weight' dequantized" in lines[0], r.stderr
    assert f"in {tmp_path} (File too large); set TMPDIR" in lines[0]
    assert list(tmp_path.iterdir()) == []  # the temporary file went with the error
