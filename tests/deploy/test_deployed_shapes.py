"""A GPTQ or compressed-tensors folder whose module tensors do not fit each other (one row or column short,
or missing) is refused by `surgery dequantize` in one line naming the tensor, before anything is written.
Without the header checks some of these broadcast silently into a wrong weight (GPTQ ``qzeros`` with one
group row: its zero points reused for every group), the others failed with a numpy or torch traceback."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from modelsurgery.deploy import deploy
from modelsurgery.ops.quantize.grids import QuantScheme
from tests.deploy.conftest import rtn_source

runner = CliRunner()
MODULE = "model.layers.0.self_attn.q_proj"
#: format -> the module's tensors that must fit each other
TENSORS = {"gptq": ["qweight", "qzeros", "scales", "g_idx"],
           "compressed-tensors": ["weight_packed", "weight_zero_point", "weight_scale", "weight_shape"]}
#: (format, tensor, axis cut by one; None: tensor dropped); qweight and weight_packed dropped leave no module
CASES = [(fmt, t, axis) for fmt, names in TENSORS.items() for t in names for axis in (0, 1)
         if not (t in ("g_idx", "weight_shape") and axis == 1)]
CASES += [("gptq", "qzeros", None), ("gptq", "scales", None), ("compressed-tensors", "weight_scale", None),
          ("compressed-tensors", "weight_shape", None)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = {}
    for fmt in TENSORS:  # asymmetric: compressed-tensors stores its zero points; groups of 16
        folder = tmp_path_factory.mktemp(fmt) / "model"
        deploy(rtn_source(fmt, QuantScheme(4, "group", 16, False), skip=()), folder, fmt)
        out[fmt] = folder
    return out


@pytest.mark.parametrize("fmt,tensor,axis", CASES)
def test_module_tensors_that_do_not_fit_refused_in_one_line(written, tmp_path, fmt, tensor, axis):
    import shutil

    folder = tmp_path / "in"
    shutil.copytree(written[fmt], folder)
    tensors = load_file(folder / "model.safetensors")
    name = f"{MODULE}.{tensor}"
    if axis is None:
        del tensors[name]
    else:
        tensors[name] = tensors[name].narrow(axis, 0, tensors[name].shape[axis] - 1).contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    r = runner.invoke(app, ["dequantize", str(folder), "-o", str(out)])
    assert r.exit_code == 1, r.output
    text = " ".join(r.output.split())
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert f"'{name}'" in text, text  # the tensor itself, or the one it does not fit
    assert ("is missing" if axis is None else "has shape") in text, text
    assert not out.exists()


@pytest.mark.parametrize("fmt", list(TENSORS))
def test_fitting_folder_dequantizes(written, tmp_path, fmt):
    """The same folder untouched passes the checks (and a GPTQ folder without g_idx: it is optional)."""
    import shutil

    folder = tmp_path / "in"
    shutil.copytree(written[fmt], folder)
    if fmt == "gptq":
        tensors = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if not k.endswith(".g_idx")}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    r = runner.invoke(app, ["dequantize", str(folder), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
