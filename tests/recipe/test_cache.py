"""Step records: what counts as a step's files when its output is a single file."""

from modelsurgery.recipe import cache


def test_an_onnx_output_with_external_data_is_recorded_with_its_data_file(tmp_path):
    """An export above 2 GiB is OUT.onnx plus the tensors in OUT.onnx.data beside it (the ONNX file names it
    as its external data location): a changed or missing data file is not the recorded output."""
    model, data = tmp_path / "model.onnx", tmp_path / "model.onnx.data"
    model.write_bytes(b"graph")
    data.write_bytes(b"weights-1")
    recorded = cache.tree_state(model)
    assert cache.same_state(recorded, model)
    data.write_bytes(b"weights-2")
    assert not cache.same_state(recorded, model)
    data.unlink()
    assert not cache.same_state(recorded, model)
