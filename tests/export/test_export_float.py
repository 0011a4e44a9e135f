"""Float exports of every family: onnx.checker, ONNX Runtime against torch, and against transformers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.export import ExportOptions, export_checkpoint, ort_session
from tests.hf_tiny import load_hf, save_tiny_bert, save_tiny_gpt2, save_tiny_llama

SAVERS = {"gpt2": save_tiny_gpt2, "llama": save_tiny_llama, "bert": save_tiny_bert}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: saver(root / name) for name, saver in SAVERS.items()}


def token_inputs(batch: int, seq: int, vocab: int = 97, seed: int = 0, types: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - seq // 3:] = 0  # right padding in the first row
    feeds = {"input_ids": ids, "attention_mask": mask}
    if types:
        feeds["token_type_ids"] = (rng.random((batch, seq)) < 0.5).astype(np.int64)
    return feeds


def transformers_output(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hf_export_matches_transformers(tmp_path, hf_folders, family):
    folder = hf_folders[family]
    report = export_checkpoint(folder, tmp_path / "m.onnx")
    assert report.family == family and report.check.passed
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    reference = load_hf(folder)
    session = ort_session(tmp_path / "m.onnx")
    names = [i.name for i in session.get_inputs()]
    expected_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if family == "bert" else [])
    assert names == expected_inputs
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state" if family == "bert" else "logits"]
    for batch, seq in [(1, 3), (3, 17), (5, 9)]:  # dynamic batch and sequence axes, other shapes than traced
        feeds = token_inputs(batch, seq, seed=batch, types=family == "bert")
        got = session.run(None, feeds)[0]
        want = transformers_output(reference, feeds)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4


def test_fp16_export_runs_in_fp16(tmp_path, hf_folders):
    report = export_checkpoint(hf_folders["gpt2"], tmp_path / "h.onnx", ExportOptions(dtype="fp16"))
    assert report.check.passed and report.check.max_abs_diff <= 5e-2
    fp32 = export_checkpoint(hf_folders["gpt2"], tmp_path / "f.onnx")
    assert report.file_bytes < 0.6 * fp32.file_bytes
    session = ort_session(tmp_path / "h.onnx")
    feeds = token_inputs(2, 10, seed=3)
    got = session.run(None, feeds)[0]
    assert got.dtype == np.float16
    want = transformers_output(load_hf(hf_folders["gpt2"]), feeds)
    assert np.abs(got.astype(np.float32) - want).max() < 5e-2


def _mlp_numpy(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """The digits MLP by hand: relu(x W0^T + b0) -> relu(. W2^T + b2) -> . W4^T + b4."""
    h = x.astype(np.float64)
    for i, layer in enumerate(("0", "2", "4")):
        h = h @ state[f"{layer}.weight"].double().numpy().T + state[f"{layer}.bias"].double().numpy()
        if i < 2:
            h = np.maximum(h, 0)
    return h


def test_mlp_fixture_matches_hand_computation(tmp_path, fixtures_dir):
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    if not src.exists():
        pytest.skip("fixtures not generated")
    report = export_checkpoint(src, tmp_path / "mlp.onnx")
    assert report.inputs == ["input"] and report.outputs == ["logits"]
    x = np.random.default_rng(0).random((7, 64)).astype(np.float32)
    got = ort_session(tmp_path / "mlp.onnx").run(None, {"input": x})[0]
    assert np.abs(got - _mlp_numpy(load_file(str(src)), x)).max() < 1e-4


@pytest.mark.parametrize("name", ["cnn_seed0", "resnet_seed0"])
def test_conv_fixtures_export(tmp_path, fixtures_dir, name):
    src = fixtures_dir / "digits" / f"{name}.safetensors"
    if not src.exists():
        pytest.skip("fixtures not generated")
    report = export_checkpoint(src, tmp_path / "c.onnx")
    assert report.check.passed and report.op_counts.get("Conv", 0) >= 2
    onnx.checker.check_model(str(tmp_path / "c.onnx"), full_check=True)
    from modelsurgery.families import detect_family

    family = detect_family(Checkpoint.open(src))
    module = family.build_module()
    x = torch.rand(9, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    got = ort_session(tmp_path / "c.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - module(input=x).numpy()).max() < 1e-4


def test_external_data_above_threshold(tmp_path, hf_folders):
    out = tmp_path / "ext.onnx"
    report = export_checkpoint(hf_folders["llama"], out, ExportOptions(external_data_threshold=0))
    assert report.external_data and report.check.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    external = [i for i in header.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 21  # every weight matrix of the 3 blocks lives in ext.onnx.data
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in header.graph.initializer if len(i.dims) == 2)
    # a default export of the same model is self-contained, and replacing with --force drops the stale data file
    export_checkpoint(hf_folders["llama"], out, ExportOptions(force=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx"]


def test_opset_21_float_export(tmp_path, hf_folders):
    report = export_checkpoint(hf_folders["bert"], tmp_path / "b.onnx", ExportOptions(opset=21))
    model = onnx.load(str(tmp_path / "b.onnx"))
    assert report.opset == 21 and model.opset_import[0].version == 21 and report.check.passed


def test_custom_model_with_model_option(tmp_path):
    from tests.custom_models import TinyConvNet

    torch.manual_seed(0)
    save_file(TinyConvNet().state_dict(), str(tmp_path / "c.safetensors"))
    report = export_checkpoint(tmp_path / "c.safetensors", tmp_path / "c.onnx",
                               ExportOptions(model="tests.custom_models:tiny_convnet"))
    assert report.inputs == ["image"] and report.check.passed


def test_check_on_data_files(tmp_path, fixtures_dir):
    data = fixtures_dir / "data"
    if not (data / "digits_eval.safetensors").exists() or not (fixtures_dir / "charlm" / "gpt2").exists():
        pytest.skip("fixtures not generated")
    report = export_checkpoint(fixtures_dir / "digits" / "cnn_seed0.safetensors", tmp_path / "c.onnx",
                               ExportOptions(data=data / "digits_eval.safetensors", samples=32))
    assert report.check.passed and report.check.input_shapes == {"input": [32, 1, 8, 8]}  # [N, 64] reshaped
    report = export_checkpoint(fixtures_dir / "charlm" / "gpt2", tmp_path / "g.onnx",
                               ExportOptions(data=data / "charlm_calib.txt", seq_len=20))
    assert report.check.passed and report.check.input_shapes["input_ids"] == [4, 20]
    from modelsurgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match=r"digits_eval\.safetensors: holds feature inputs but the gpt2 model"):
        export_checkpoint(fixtures_dir / "charlm" / "gpt2", tmp_path / "x.onnx",
                          ExportOptions(data=data / "digits_eval.safetensors"))
    assert not (tmp_path / "x.onnx").exists()
