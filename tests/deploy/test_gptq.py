"""GPTQ (v1 checkpoint_format) output read back by an independent dequantizer written from the
reference implementations' documented layout (AutoGPTQ / GPTQModel ``QuantLinear``: shift-and-mask
unpacking of ``qweight`` along the input dimension and ``qzeros`` along the output dimension,
3-bit codes laid 32 to 3 words with codes 10 and 21 straddling words, v1 zeros stored minus one,
W = scales[g_idx] * (q - zeros[g_idx])).

This is the default-suite check, needing no GPTQ package. GPTQModel itself (transformers' GPTQ path,
through optimum, with its pure-torch kernel on CPU) loads these folders in the slow
tests/deploy/test_gptq_gptqmodel.py, where its own dequantization and logits are compared.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.deploy import check_scheme, deploy, read_deployed
from modelsurgery.deploy.common import DeploySource
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.grids import QuantScheme
from tests.deploy.conftest import rtn_source

SCHEMES = {"w4-g32-sym": QuantScheme(4, "group", 32, True), "w3-g16-asym": QuantScheme(3, "group", 16, False),
           "w2-channel-asym": QuantScheme(2, "channel", None, False), "w8-g16-sym": QuantScheme(8, "group", 16, True)}


def unpack_input_dim(qweight: np.ndarray, bits: int) -> np.ndarray:
    """[I * bits / 32, O] int32 -> codes [I, O], as the reference QuantLinear unpacks qweight."""
    words = qweight.astype(np.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per = 32 // bits
        shifts = np.arange(per, dtype=np.int64) * bits
        codes = (words[:, None, :] >> shifts[None, :, None]) & mask  # [words, per, O]
        return codes.reshape(-1, words.shape[1])
    assert bits == 3
    w0, w1, w2 = words[0::3], words[1::3], words[2::3]
    cols = [(w0 >> (3 * j)) & 7 for j in range(10)]
    cols.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    cols += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
    cols.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    cols += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
    return np.stack(cols, axis=1).reshape(-1, words.shape[1])  # [groups of 32, 32, O] -> [I, O]


def reference_dequantize(tensors: dict[str, np.ndarray], bits: int) -> np.ndarray:
    codes = unpack_input_dim(tensors["qweight"], bits)
    zeros = unpack_input_dim(tensors["qzeros"].T, bits).T + 1  # packed along O; v1: stored minus one
    g = tensors["g_idx"].astype(np.int64)
    scales = tensors["scales"].astype(np.float32)
    return (scales[g] * (codes - zeros[g]).astype(np.float32)).T  # [O, I]


@pytest.fixture(scope="module", params=list(SCHEMES))
def written(request, tmp_path_factory):
    scheme = SCHEMES[request.param]
    # 3-bit codes fill int32 words only 32 at a time: the 176-wide MLP stays float there
    skip = ("down_proj",) if scheme.group_size == 32 else ("mlp",) if scheme.bits == 3 else ()
    src = rtn_source("gptq", scheme, skip=skip)
    out = tmp_path_factory.mktemp("gptq") / "model"
    return src, out, deploy(src, out, "gptq")


def test_reference_dequantization_returns_our_weights_exactly(written):
    src, out, report = written
    assert report.max_scale_rounding_error == 0.0
    stored = Checkpoint.open(out)
    for w in src.weights:
        module = w.name[: -len(".weight")]
        tensors = {k: stored.get(f"{module}.{k}").numpy() for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert tensors["qweight"].dtype == np.int32 and tensors["qzeros"].dtype == np.int32
        assert tensors["scales"].dtype == np.float16 and tensors["g_idx"].dtype == np.int32
        out_features, in_features = w.shape
        assert tensors["qweight"].shape == (in_features * w.bits // 32, out_features)
        np.testing.assert_array_equal(reference_dequantize(tensors, w.bits), w.dequantize().numpy())


def test_quantization_config(written):
    src, out, _ = written
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    s = src.scheme
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq"
    assert config["bits"] == s.bits and config["sym"] == s.symmetric and config["desc_act"] is False
    assert config["group_size"] == (s.group_size if s.granularity == "group" else -1)
    assert config["block_name_to_quantize"] == "model.layers"


def test_our_reader_gives_the_representation_back(written):
    src, out, _ = written
    back = {w.name: w for w in read_deployed(Checkpoint.open(out))}
    for w in src.weights:
        np.testing.assert_array_equal(back[w.name].codes, w.codes)
        np.testing.assert_array_equal(back[w.name].zero_point, w.zero_point)
        np.testing.assert_array_equal(back[w.name].scale, w.scale)


def test_zero_point_zero_refused_and_nothing_written(tmp_path):
    """v1 stores zero - 1: 0 would be stored as -1 and read back as 2^bits by every v1 reader."""
    src = rtn_source("gptq", SCHEMES["w3-g16-asym"], skip=("mlp",))
    w = src.weights[0]
    w.zero_point = w.zero_point.copy()
    w.zero_point[0, 0] = 0
    with pytest.raises(SurgeryError, match=f"tensor '{w.name}': a zero point of 0 cannot be stored in GPTQ v1"):
        deploy(DeploySource(src.ckpt, [w], src.scheme), tmp_path / "m", "gptq")
    assert list(tmp_path.iterdir()) == []


def test_head_refused_and_nothing_written(tmp_path):
    """A packed checkpoint whose output head is quantized: transformers' GPTQ loader (optimum) replaces only
    the blocks' Linears, so lm_head's GPTQ tensors would be ignored and lm_head.weight left uninitialised."""
    src = rtn_source("gptq", SCHEMES["w4-g32-sym"],
                     select=lambda n: n.endswith("_proj.weight") or n == "lm_head.weight")
    assert "lm_head.weight" in src.quantized()
    with pytest.raises(SurgeryError, match="tensor 'lm_head.weight': --format gptq quantizes Linear layers inside the "
                                           "blocks"):
        deploy(src, tmp_path / "m", "gptq")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field,value,message", [
    ("dynamic", {"+:.*mlp.*": {"bits": 8}}, "'dynamic' overrides modules matching '\\+:.\\*mlp.\\*'"),
    ("pack_dtype", "int16", "pack_dtype 'int16' is not read"),
    ("rotation", "hadamard", "rotation 'hadamard'"),
])
def test_reader_refuses_what_changes_the_decoding(tmp_path, written, field, value, message):
    """GPTQModel's quantization_config fields (QuantizeConfig.to_dict) under which the tensors decode
    otherwise: per-module schemes, other word sizes, rotated weights."""
    import shutil

    _, out, _ = written
    folder = tmp_path / "m"
    shutil.copytree(out, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SurgeryError, match=message) as e:
        read_deployed(Checkpoint.open(folder))
    assert "\n" not in str(e.value)
    del config["quantization_config"][field]
    config["quantization_config"]["dynamic"] = {"-:.*lm_head": {}}  # a skip rule changes nothing read
    (folder / "config.json").write_text(json.dumps(config))
    assert len(read_deployed(Checkpoint.open(folder))) == len(read_deployed(Checkpoint.open(out)))


def test_packed_head_refused_on_conversion(tmp_path):
    """The same refusal when a packed checkpoint (its names are the codes') is converted."""
    from typer.testing import CliRunner

    from modelsurgery.cli.app import app
    from modelsurgery.deploy import convert_packed
    from tests.deploy.conftest import LLAMA

    res = CliRunner().invoke(app, ["quantize", str(LLAMA), "-o", str(tmp_path / "packed"), "--format", "packed",
                                   "--method", "rtn", "--no-default-skips", "--skip", "embed_tokens", "-q"])
    assert res.exit_code == 0, res.output
    with pytest.raises(SurgeryError, match="tensor 'lm_head.weight': --format gptq quantizes Linear layers inside"):
        convert_packed(tmp_path / "packed", tmp_path / "gptq", "gptq")
    assert not (tmp_path / "gptq").exists()
    convert_packed(tmp_path / "packed", tmp_path / "gptq", "compressed-tensors")  # it holds a quantized head


def test_bert_names_its_blocks(tmp_path):
    """optimum finds decoder blocks by name ('model.layers', 'transformer.h', ...) but not BERT's: the
    folder says where they are (see test_gptq_gptqmodel for transformers loading it)."""
    from typer.testing import CliRunner

    from modelsurgery.cli.app import app
    from modelsurgery.deploy import convert_packed
    from tests.hf_tiny import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "bert")
    for fmt in ("packed", "gptq"):
        res = CliRunner().invoke(app, ["quantize", str(bert), "-o", str(tmp_path / fmt), "--format", fmt, "--method",
                                       "rtn", "-q"])
        assert res.exit_code == 0, res.output
    convert_packed(tmp_path / "packed", tmp_path / "converted", "gptq")
    for folder in (tmp_path / "gptq", tmp_path / "converted"):
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["block_name_to_quantize"] == "encoder.layer", folder


def test_schemes_refused():
    for scheme in (QuantScheme(5, "group", 32, True), QuantScheme(4, "tensor", None, True)):
        with pytest.raises(SurgeryError, match="--format gptq stores 2, 3, 4 or 8-bit weights"):
            check_scheme("gptq", scheme)


def test_scales_rounded_to_fp16_are_reported(tmp_path):
    """A packed checkpoint quantized without the fp16 grid converts with its scales rounded: the report
    says how far the weights moved."""
    src = rtn_source("gptq", SCHEMES["w4-g32-sym"])
    w = src.weights[0]
    w.scale = (w.scale * np.float32(1 + 2**-13)).astype(np.float32)  # off the fp16 grid
    report = deploy(DeploySource(src.ckpt, [w], src.scheme), tmp_path / "m", "gptq")
    expected = float(torch.max(torch.abs(w.dequantize() - torch.from_numpy(reference_dequantize(
        {k: Checkpoint.open(tmp_path / "m").get(f"{w.name[:-7]}.{k}").numpy()
         for k in ("qweight", "qzeros", "scales", "g_idx")}, 4)))))
    assert report.max_scale_rounding_error == pytest.approx(expected) and expected > 0
