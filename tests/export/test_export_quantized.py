"""Packed 4/8-bit checkpoints: integer weights in the file, DequantizeLinear in front of the matmuls,
ONNX Runtime (default session options) against the dequantized forward of transformers and torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.export import ExportOptions, export_checkpoint, ort_session
from modelsurgery.families import detect_family
from tests.export.packing import write_packed
from tests.export.test_export_float import SAVERS, token_inputs, transformers_output
from tests.hf_tiny import load_hf

SCHEMES = [(8, None), (4, None), (4, 16)]  # int8 per channel, 4-bit per channel, 4-bit blocked per group


def linear_weights(folder) -> list[str]:
    family = detect_family(Checkpoint.open(folder))
    return [lin.weight for i in range(family.num_layers) for lin in family.block_linears(i).values()]


def conv1d_weights(folder) -> frozenset[str]:
    """GPT-2's (in, out) weights, which the quantize command packs per output channel ("transposed")."""
    family = detect_family(Checkpoint.open(folder))
    return frozenset(lin.weight for i in range(family.num_layers) for lin in family.block_linears(i).values()
                     if lin.transposed)


def optimized_ops(path, config: dict | None = None) -> set[str]:
    """Node types after ONNX Runtime's default graph optimisations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    for k, v in (config or {}).items():
        options.add_session_config_entry(k, v)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def integer_initializers(path) -> dict[str, int]:
    model = onnx.load(str(path))
    return {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("_quant.q")}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("bits,group", SCHEMES)
def test_packed_hf_export_matches_dequantized_transformers(tmp_path, family, bits, group):
    folder = SAVERS[family](tmp_path / "float")
    names = linear_weights(folder)
    packed, deq = write_packed(Checkpoint.open(folder).state_dict(), names, tmp_path / "packed", bits, group,
                               config_from=folder, transposed=conv1d_weights(folder))
    out = tmp_path / "q.onnx"
    report = export_checkpoint(packed, out)
    assert report.opset == 21 and report.session_config == {} and report.check.passed
    assert report.quantization["integer_weights"] == len(names) and report.quantization["float_weights"] == []
    onnx.checker.check_model(str(out), full_check=True)
    kinds = integer_initializers(out)
    assert len(kinds) == len(names)
    assert set(kinds.values()) == {onnx.TensorProto.UINT8 if bits == 8 else onnx.TensorProto.UINT4}
    assert report.op_counts["DequantizeLinear"] == len(names)
    # the reference: transformers' own model holding the dequantized weights
    reference = load_hf(folder)
    missing, unexpected = reference.load_state_dict(deq, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # GPT-2's head is tied to wte
    feeds = token_inputs(3, 11, seed=bits, types=family == "bert")
    got = ort_session(out).run(None, feeds)[0]  # default session options
    assert np.abs(got - transformers_output(reference, feeds)).max() < 1e-4
    assert "MatMulNBits" not in optimized_ops(out)  # faithful: ORT did not swap in its int8-activation kernel


@pytest.mark.parametrize("name,bits,group", [("mlp_seed0", 4, 16), ("cnn_seed0", 8, None), ("cnn_seed0", 4, 8),
                                             ("resnet_seed0", 4, 8)])
def test_packed_digits_export(tmp_path, fixtures_dir, name, bits, group):
    src = fixtures_dir / "digits" / f"{name}.safetensors"
    if not src.exists():
        pytest.skip("fixtures not generated")
    ckpt = Checkpoint.open(src)
    state = ckpt.state_dict()
    names = [k for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)]  # linears and conv kernels
    packed, deq = write_packed(state, names, tmp_path / "p.safetensors", bits, group, metadata=ckpt.metadata)
    out = tmp_path / "q.onnx"
    report = export_checkpoint(packed, out)
    assert report.quantization["integer_weights"] == len(names) and report.check.passed
    module = detect_family(ckpt).build_module(state=deq)  # the float family module, dequantized weights
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x = x.flatten(1) if name.startswith("mlp") else x
    got = ort_session(out).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - module(input=x).numpy()).max() < 1e-4


def test_int8_at_opset_13_names_the_session_setting(tmp_path):
    folder = SAVERS["llama"](tmp_path / "float")
    packed, _ = write_packed(Checkpoint.open(folder).state_dict(), linear_weights(folder), tmp_path / "packed", 8,
                             config_from=folder)
    report = export_checkpoint(packed, tmp_path / "q.onnx", ExportOptions(opset=13))
    assert report.opset == 13 and report.check.passed
    assert report.session_config == {"session.qdq_matmulnbits_accuracy_level": "0"}
    assert any("session config" in w for w in report.warnings)
    assert set(integer_initializers(tmp_path / "q.onnx").values()) == {onnx.TensorProto.UINT8}


def test_four_bit_export_is_small_and_runs_with_default_options(tmp_path):
    folder = SAVERS["gpt2"](tmp_path / "float", n_embd=128, n_layer=2)
    names = linear_weights(folder)
    state = Checkpoint.open(folder).state_dict()
    linear_bytes = sum(state[n].numel() * 4 for n in names)
    packed, _ = write_packed(state, names, tmp_path / "packed", 4, 32, config_from=folder)
    float_report = export_checkpoint(folder, tmp_path / "f.onnx")
    q_report = export_checkpoint(packed, tmp_path / "q.onnx")
    saved = float_report.file_bytes - q_report.file_bytes
    assert saved >= 0.8 * linear_bytes, (saved, linear_bytes)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"))  # default options, nothing set
    feeds = token_inputs(2, 6)
    got = session.run(None, feeds)[0]
    assert got.shape == (2, 6, 97)
    # the documented latency setting folds DequantizeLinear into float weights at load, same results
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    folded = ort.InferenceSession(str(tmp_path / "q.onnx"), options)
    assert np.abs(folded.run(None, feeds)[0] - got).max() < 1e-4
    assert "DequantizeLinear" not in {n.op_type for n in onnx.load(str(tmp_path / "folded.onnx")).graph.node}


def test_opset_too_old_for_four_bit_writes_nothing(tmp_path):
    folder = SAVERS["gpt2"](tmp_path / "float")
    packed, _ = write_packed(Checkpoint.open(folder).state_dict(), linear_weights(folder), tmp_path / "packed", 4,
                             config_from=folder)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SurgeryError, match=r"4-bit weights.*--opset 21 or newer \(got 17\); nothing was written"):
        export_checkpoint(packed, out / "q.onnx", ExportOptions(opset=17))
    assert list(out.iterdir()) == []


def test_gpt2_rows_as_stored(tmp_path):
    """The contract read literally: GPT-2's (in, out) weights packed with rows = first dimension."""
    folder = SAVERS["gpt2"](tmp_path / "float")
    packed, deq = write_packed(Checkpoint.open(folder).state_dict(), linear_weights(folder), tmp_path / "packed",
                               4, 16, config_from=folder)
    report = export_checkpoint(packed, tmp_path / "q.onnx")
    assert report.quantization["float_weights"] == [] and report.check.passed
    reference = load_hf(folder)
    reference.load_state_dict(deq, strict=False)
    feeds = token_inputs(2, 7)
    got = ort_session(tmp_path / "q.onnx").run(None, feeds)[0]
    assert np.abs(got - transformers_output(reference, feeds)).max() < 1e-4


def test_fp16_packed_export(tmp_path):
    folder = SAVERS["llama"](tmp_path / "float")
    packed, deq = write_packed(Checkpoint.open(folder).state_dict(), linear_weights(folder), tmp_path / "packed",
                               8, None, config_from=folder)
    with pytest.raises(SurgeryError, match=r"float16 scales in DequantizeLinear need --opset 19 or newer"):
        export_checkpoint(packed, tmp_path / "h.onnx", ExportOptions(dtype="fp16", opset=17))
    assert not (tmp_path / "h.onnx").exists()
    report = export_checkpoint(packed, tmp_path / "h.onnx", ExportOptions(dtype="fp16"))
    assert report.check.passed and report.quantization["float_weights"] == []
    scales = [i for i in onnx.load(str(tmp_path / "h.onnx")).graph.initializer if i.name.endswith("_quant.scale")]
    assert scales and {i.data_type for i in scales} == {onnx.TensorProto.FLOAT16}
    reference = load_hf(folder)
    reference.load_state_dict(deq, strict=False)
    feeds = token_inputs(2, 9)
    got = ort_session(tmp_path / "h.onnx").run(None, feeds)[0]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - transformers_output(reference, feeds)).max() < 5e-2


def test_symmetric_weights_are_signed_without_zero_point(tmp_path):
    folder = SAVERS["llama"](tmp_path / "float")
    packed, deq = write_packed(Checkpoint.open(folder).state_dict(), linear_weights(folder), tmp_path / "packed",
                               4, 16, symmetric=True, config_from=folder)
    out = tmp_path / "q.onnx"
    report = export_checkpoint(packed, out)
    assert report.check.passed and report.quantization["float_weights"] == []
    assert set(integer_initializers(out).values()) == {onnx.TensorProto.INT4}
    model = onnx.load(str(out))
    assert not [i for i in model.graph.initializer if i.name.endswith("_quant.zero_point")]
    assert {len(n.input) for n in model.graph.node if n.op_type == "DequantizeLinear"} == {2}
    reference = load_hf(folder)
    reference.load_state_dict(deq, strict=False)
    feeds = token_inputs(2, 9)
    assert np.abs(ort_session(out).run(None, feeds)[0] - transformers_output(reference, feeds)).max() < 1e-4
    assert "MatMulNBits" not in optimized_ops(out)


@pytest.mark.parametrize("source,embeddings", [
    ("charlm/llama", ["model.embed_tokens.weight"]),
    ("charlm/gpt2", ["transformer.wte.weight", "transformer.wpe.weight"]),
])
def test_no_default_skips_quantizes_embeddings_and_exports_a_gather_on_dequantized_rows(tmp_path, fixtures_dir,
                                                                                        source, embeddings):
    """`--no-default-skips` rounds every embedding table to nearest per row (issue #11 item 6: it used to
    add only the LM head); the packed rows are the hand-computed symmetric RTN of each row, and the ONNX
    graph gathers the token rows from a DequantizeLinear of the integer table."""
    from typer.testing import CliRunner

    from modelsurgery.cli.app import app
    from modelsurgery.ops.quantize.packing import dequantize_checkpoint

    src = fixtures_dir / source
    packed = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(packed), "--method", "rtn", "--bits", "4",
                                 "--format", "packed", "--no-default-skips", "--json"])
    assert r.exit_code == 0, r.output
    float_state = Checkpoint.open(src)
    state = dequantize_checkpoint(Checkpoint.open(packed))
    for name in embeddings:
        w = float_state.get(name).float()
        # symmetric 4-bit per row, written out: scale = 2 max|w| / 15, codes round(w / s) + 8 clamped to [0, 15]
        scale = (2 * w.abs().amax(1, keepdim=True) / 15).clamp_min(1e-8)
        expected = (torch.clamp(torch.round(w / scale) + 8, 0, 15) - 8) * scale
        assert torch.allclose(state[name], expected, rtol=0, atol=1e-6), name
        assert not torch.equal(state[name], w)

    report = export_checkpoint(packed, tmp_path / "q.onnx")
    assert report.quantization["float_weights"] == []
    graph = onnx.load(tmp_path / "q.onnx").graph
    produced_by = {o: n for n in graph.node for o in n.output}
    initializers = {i.name: i for i in graph.initializer}
    table_gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in produced_by
                     and produced_by[n.input[0]].op_type == "DequantizeLinear"]
    assert len(table_gathers) == len(embeddings)
    for n in table_gathers:
        codes = initializers[produced_by[n.input[0]].input[0]]
        assert codes.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    family = detect_family(Checkpoint.from_state_dict(state, config=float_state.config))
    inputs = family.example_inputs(batch=2, seq_len=9, generator=torch.Generator().manual_seed(3))
    got = ort_session(tmp_path / "q.onnx").run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        assert np.abs(got - family.build_module()(**inputs).numpy()).max() < 1e-4
