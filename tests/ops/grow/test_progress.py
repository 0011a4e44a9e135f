"""Every growth method reports progress through the operations' callback: the writer's "write" task counts
up to the number of tensors the output holds (read back with safetensors), and MixtureGrowth's own tasks
(the templates' SVDs, the grown layers) count up to its number of layers."""

from __future__ import annotations

import pytest

from modelsurgery.ops.grow import GrowOptions, grow
from tests.ops.grow.helpers import hf_folder, save_mlp
from tests.progress_record import Recorder, tensors_in


@pytest.mark.parametrize("options,blocks", [
    (GrowOptions(method="stack", factor=2), 6),
    (GrowOptions(method="stack", layers="0:2,1:3"), 4),
    (GrowOptions(method="interleave", every=1), 6),
])
def test_depth_methods_report_every_tensor_written(tmp_path, options, blocks):
    src = hf_folder(tmp_path, "llama")  # 3 blocks of 9 tensors, embeddings, final norm, head
    rec = Recorder()
    report = grow([src], tmp_path / "out", options, rec)
    assert report.layers_after == blocks
    n = tensors_in(tmp_path / "out")
    assert n == 3 + 9 * blocks  # by hand, from the layout
    rec.finished("write", n)


def test_width_reports_every_tensor_written(tmp_path):
    src = save_mlp(tmp_path / "mlp.safetensors")  # three linears: 6 tensors
    rec = Recorder()
    grow([src], tmp_path / "wide.safetensors", GrowOptions(method="width", factor=2), rec)
    assert rec.finished("write", 6) == [0, 1, 2, 3, 4, 5, 6]


def test_mixture_reports_templates_layers_and_writing(tmp_path):
    srcs = [save_mlp(tmp_path / f"m{i}.safetensors", seed=i) for i in range(2)]
    rec = Recorder()
    grow(srcs, tmp_path / "mix.safetensors", GrowOptions(method="mixture"), rec)
    rec.finished("templates", 3)
    rec.finished("mixture", 3)
    rec.finished("write", tensors_in(tmp_path / "mix.safetensors"))
    order = [task for task, *_ in rec.calls]
    assert order.index("templates") < order.index("mixture") < order.index("write")
