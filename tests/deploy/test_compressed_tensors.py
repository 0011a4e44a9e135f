"""compressed-tensors pack-quantized output checked with the ``compressed-tensors`` package's own
decompressor and with transformers loading the folder (its CompressedTensors quantizer) on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.deploy import check_scheme, deploy, read_deployed
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.grids import QuantScheme
from tests.deploy.conftest import reference_model, rtn_source

pytest.importorskip("compressed_tensors")

SCHEMES = {"w4-group16-sym": QuantScheme(4, "group", 16, True), "w4-group16-asym": QuantScheme(4, "group", 16, False),
           "w3-channel-asym": QuantScheme(3, "channel", None, False)}


@pytest.fixture(scope="module", params=list(SCHEMES))
def written(request, tmp_path_factory):
    src = rtn_source("compressed-tensors", SCHEMES[request.param], skip=())
    out = tmp_path_factory.mktemp("ct") / "model"
    report = deploy(src, out, "compressed-tensors")
    return src, out, report


def test_package_decompressor_returns_our_weights_exactly(written):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    src, out, report = written
    assert report.max_scale_rounding_error == 0.0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    stored = Checkpoint.open(out)
    for w in src.weights:
        module = w.name[: -len(".weight")]
        assert module in scheme.targets
        local = {k[len(module) + 1:]: stored.get(k) for k in stored.keys() if k.startswith(module + ".")}  # noqa: SIM118
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, w.dequantize(), rtol=0, atol=0)


def test_transformers_loads_the_folder_and_matches_our_forward(written, token_ids):
    """Decompressed on load (``dequantize=True``) for every scheme; kept compressed (the default) for
    symmetric ones: transformers 5.24 with compressed-tensors 0.20 cannot keep an asymmetric
    pack-quantized model compressed (its in-memory layer expects an unpacked zero point, while
    llm-compressor and the package's compressor store it packed; llm-compressor issue #1618)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    src, out, _ = written
    with torch.no_grad():
        ours = reference_model(src)(token_ids).logits
    loads = [{"quantization_config": CompressedTensorsConfig(dequantize=True)}]
    if src.scheme.symmetric:
        loads.append({})
    for kwargs in loads:
        model = AutoModelForCausalLM.from_pretrained(out, **kwargs).eval()
        packed = any(k.endswith("weight_packed") for k in model.state_dict())
        assert packed == (not kwargs)  # kept compressed by default, decompressed with dequantize=True
        with torch.no_grad():
            theirs = model(token_ids).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_our_reader_gives_the_representation_back(written):
    src, out, _ = written
    back = {w.name: w for w in read_deployed(Checkpoint.open(out))}
    assert set(back) == {w.name for w in src.weights}
    for w in src.weights:
        np.testing.assert_array_equal(back[w.name].codes, w.codes)
        np.testing.assert_array_equal(back[w.name].zero_point, w.zero_point)
        np.testing.assert_array_equal(back[w.name].scale, w.scale)


def test_per_tensor_scheme_refused():
    with pytest.raises(SurgeryError, match="--format compressed-tensors .* --granularity channel or group"):
        check_scheme("compressed-tensors", QuantScheme(4, "tensor", None, True))


def test_file_output_refused(tmp_path):
    src = rtn_source("compressed-tensors", SCHEMES["w4-group16-sym"], skip=())
    with pytest.raises(SurgeryError, match="writes a model folder"):
        deploy(src, tmp_path / "m.safetensors", "compressed-tensors")
    assert list(tmp_path.iterdir()) == []


def test_several_config_groups_read_with_their_own_schemes(tmp_path):
    """A mixed-precision folder as llm-compressor writes it (one config group per scheme, targets as
    "re:" patterns), compressed here by the package's own compressor: attention 4-bit groups of 16
    symmetric, MLP 8-bit per channel asymmetric. Each module is read with its group's scheme and
    dequantizes to what the package's decompressor gives."""
    import shutil

    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    from tests.deploy.conftest import LLAMA

    args = {"attn": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16},
            "mlp": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"}}
    targets = {"attn": ["re:.*self_attn\\..*_proj$"], "mlp": ["re:.*mlp\\..*_proj$"]}
    schemes = {k: QuantizationScheme(targets=targets[k], weights=args[k]) for k in args}
    ckpt = Checkpoint.open(LLAMA)
    tensors, expected = {}, {}
    for name in ckpt.keys():  # noqa: SIM118
        w = ckpt.get(name)
        if not name.endswith("_proj.weight"):
            tensors[name] = w
            continue
        module = name[: -len(".weight")]
        scheme = schemes["attn" if ".self_attn." in name else "mlp"]
        g = w.reshape(w.shape[0], -1, scheme.weights.group_size or w.shape[1])
        scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
        local = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
        stored = PackedQuantizationCompressor.compress(local, scheme)
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in stored.items()})
        expected[name] = PackedQuantizationCompressor.decompress(stored, scheme)["weight"]
    folder = tmp_path / "mixed"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((LLAMA / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {f"group_{i}": {"targets": targets[k], "weights": args[k]}
                                                for i, k in enumerate(args)}}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(LLAMA / "tokenizer.json", folder / "tokenizer.json")
    back = {w.name: w for w in read_deployed(Checkpoint.open(folder))}
    assert set(back) == set(expected)
    for name, weight in expected.items():
        assert back[name].bits == (4 if ".self_attn." in name else 8)
        torch.testing.assert_close(back[name].dequantize(), weight.float(), rtol=0, atol=1e-6)


def test_packed_module_no_config_group_targets_refused(tmp_path, written):
    """A packed module that no config group targets has no scheme to read it with: refused, naming it."""
    import shutil

    _, out, _ = written
    folder = tmp_path / "m"
    shutil.copytree(out, folder)
    config = json.loads((folder / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    group["targets"].remove("model.layers.0.self_attn.q_proj")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SurgeryError, match="'model.layers.0.self_attn.q_proj' is packed but no config group targets"):
        read_deployed(Checkpoint.open(folder))
