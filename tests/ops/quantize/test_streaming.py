"""Streaming quantization (``streaming.py``) against the whole-model path (``streaming=False``: the
float model built first, whose results the other quantize tests check against hand-written models
and transformers): RTN writes the same bytes; calibration with blocks read lazily learns the same
codes; --device refuses what the machine lacks; --offload-dir keeps activations in files."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.quantize import QuantizeOptions, quantize_checkpoint

ROOT = Path(__file__).resolve().parents[3]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
CALIB = ROOT / "fixtures" / "data" / "digits_calib.safetensors"
LLAMA = ROOT / "fixtures" / "charlm" / "llama"
TEXT = ROOT / "fixtures" / "data" / "charlm_calib.txt"


def _weights_file(out: str) -> Path:
    p = Path(out)
    return p / "model.safetensors" if p.is_dir() else p


def _read(out: str) -> tuple[dict, dict]:
    with safe_open(str(_weights_file(out)), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _both(src, tmp_path, **kw):
    runs = {}
    for streaming in (True, False):
        out = tmp_path / f"{'stream' if streaming else 'whole'}{'.safetensors' if Path(src).is_file() else ''}"
        runs[streaming] = quantize_checkpoint(src, out, QuantizeOptions(streaming=streaming, **kw))
    assert runs[True].streamed and not runs[False].streamed
    return runs[True], runs[False]


@pytest.mark.parametrize("fmt", ["fake", "packed"])
@pytest.mark.parametrize("src", [MLP, LLAMA], ids=["mlp", "llama"])
def test_rtn_streams_the_same_bytes(tmp_path, src, fmt):
    stream, whole = _both(src, tmp_path, method="rtn", bits=4, format=fmt, default_skips=False,
                          granularity="group", group_size=16, symmetric=False)
    assert stream.layers == whole.layers
    assert _weights_file(stream.output).read_bytes() == _weights_file(whole.output).read_bytes()


GPT2 = ROOT / "fixtures" / "charlm" / "gpt2"


@pytest.mark.parametrize(("src", "fmt", "granularity"), [
    (LLAMA, "packed", "channel"), (LLAMA, "fake", "group"), (GPT2, "packed", "group"), (GPT2, "fake", "channel"),
    (ROOT / "fixtures" / "digits" / "cnn_seed0.safetensors", "packed", "channel"), (MLP, "packed", "tensor"),
], ids=["llama-packed-channel", "llama-fake-group", "gpt2-packed-group", "gpt2-fake-channel", "cnn-packed-channel",
        "mlp-packed-tensor"])
def test_rtn_in_row_chunks_writes_the_same_bytes(tmp_path, monkeypatch, src, fmt, granularity):
    """Rows rounded a few at a time (here one row at a time: columns of GPT-2's transposed Conv1D, a conv's output
    channels, an embedding's rows) give the whole-model path's bytes; per tensor, one piece."""
    from modelsurgery.ops.quantize import streaming

    monkeypatch.setattr(streaming, "RTN_CHUNK_ELEMENTS", 1)  # one row per piece
    stream, whole = _both(src, tmp_path, method="rtn", bits=4, format=fmt, default_skips=False,
                          granularity=granularity, group_size=16 if granularity == "group" else None,
                          symmetric=granularity != "channel")
    assert _weights_file(stream.output).read_bytes() == _weights_file(whole.output).read_bytes()


@pytest.fixture
def torch_threads():
    """Set torch's intra-op threads for a test (the rounding pool takes its size from them)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3])
def test_rtn_on_several_threads_writes_the_same_bytes(tmp_path, torch_threads, threads):
    """The rounding pool rounds ``threads`` weights ahead of the writer, each on its own thread; the file
    is the whole-model path's, and torch's thread count is given back."""
    torch_threads(threads)
    stream, whole = _both(LLAMA, tmp_path, method="rtn", bits=3, format="packed", default_skips=False,
                          granularity="group", group_size=16, symmetric=False)
    assert torch.get_num_threads() == threads
    assert _weights_file(stream.output).read_bytes() == _weights_file(whole.output).read_bytes()


def test_nan_met_on_a_rounding_thread_is_the_same_refusal(tmp_path, monkeypatch, torch_threads):
    """NaN/Inf in a weight rounded ahead on the pool's threads, in two pieces of rows: the write stops with the
    one-line message counting the whole weight's bad values; nothing is written and torch's thread count is
    given back."""
    from safetensors.torch import load_file, save_file

    from modelsurgery.ops.quantize import streaming

    monkeypatch.setattr(streaming, "RTN_CHUNK_ELEMENTS", 1)  # one row per piece
    torch_threads(2)
    src = tmp_path / "in"
    src.mkdir()
    for f in LLAMA.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = next(src.glob("*.safetensors"))
    state = load_file(str(weights))
    name = sorted(k for k in state if k.endswith("mlp.down_proj.weight"))[-1]
    rows, cols = state[name].shape
    state[name][0, 1] = float("nan")
    state[name][rows - 1, cols - 1] = float("inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(SurgeryError, match=rf"tensor '{name}' holds 2 NaN/Inf value\(s\) of {rows * cols};"):
        quantize_checkpoint(src, tmp_path / "q", QuantizeOptions(method="rtn", format="packed"))
    assert not (tmp_path / "q").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("method", ["flexround", "adaround"])
def test_lazy_blocks_learn_the_same_codes_mlp(tmp_path, method):
    stream, whole = _both(MLP, tmp_path, method=method, bits=3, format="packed", default_skips=False,
                          calib=CALIB, samples=64, params={"steps": 15})
    a, b = _read(stream.output)[0], _read(whole.output)[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in stream.blocks] == [r["loss"] for r in whole.blocks]


def test_lazy_blocks_learn_the_same_codes_llama(tmp_path):
    """A decoder: embeddings read for the first block's inputs, rotary tables kept as buffers, the
    output written block by block, in the order the whole-model path writes too: the same bytes."""
    stream, whole = _both(LLAMA, tmp_path, method="flexround", bits=4, format="packed", calib=TEXT,
                          samples=4, seq_len=16, params={"steps": 3, "batch_size": 2}, default_skips=False)
    (a, meta_a), (b, meta_b) = _read(stream.output), _read(whole.output)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a == meta_b
    assert _weights_file(stream.output).read_bytes() == _weights_file(whole.output).read_bytes()
    assert [r["loss"] for r in stream.blocks] == [r["loss"] for r in whole.blocks]
    assert len(stream.blocks) == detect_family(Checkpoint.open(LLAMA)).num_layers
    assert all(r["loss"] is not None for r in stream.blocks)


@pytest.mark.parametrize("src", [LLAMA, ROOT / "fixtures" / "digits" / "resnet_seed0.safetensors"],
                         ids=["llama", "resnet"])
def test_build_empty_has_no_weights_and_real_buffers(src):
    """Parameters on the meta device; buffers (a ResNet's BatchNorm statistics) read as build_module reads them."""
    family = detect_family(Checkpoint.open(src))
    empty, full = family.build_empty(), family.build_module()
    assert all(p.is_meta for p in empty.parameters())
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in full.named_parameters()]
    buffers = dict(full.named_buffers())
    assert dict(empty.named_buffers()).keys() == buffers.keys()
    assert all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers())


def test_offload_dir_keeps_the_result(tmp_path):
    offload = tmp_path / "offload"
    offload.mkdir()
    common = {"method": "flexround", "bits": 3, "format": "packed", "calib": CALIB, "samples": 64,
              "params": {"steps": 10}, "default_skips": False}
    a = quantize_checkpoint(MLP, tmp_path / "a.safetensors", QuantizeOptions(offload_dir=offload, **common))
    b = quantize_checkpoint(MLP, tmp_path / "b.safetensors", QuantizeOptions(**common))
    assert _read(a.output)[0].keys() == _read(b.output)[0].keys()
    assert all(torch.equal(x, _read(b.output)[0][k]) for k, x in _read(a.output)[0].items())
    assert list(offload.iterdir()) == []  # the mapped files were unlinked once mapped


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "tpu", "bogus:x"])
def test_unavailable_device_is_one_line_and_writes_nothing(tmp_path, device):
    out = tmp_path / "q.safetensors"
    with pytest.raises(SurgeryError, match=f"--device {device}") as e:
        quantize_checkpoint(MLP, out, QuantizeOptions(method="rtn", device=device))
    assert "\n" not in str(e.value) and not out.exists() and list(tmp_path.iterdir()) == []


def test_auto_device_on_cpu(tmp_path):
    r = quantize_checkpoint(MLP, tmp_path / "q.safetensors", QuantizeOptions(method="rtn", device="auto"))
    assert r.device == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_device_refusal_exits_1_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from modelsurgery.cli.app import app

    res = CliRunner().invoke(app, ["quantize", str(MLP), "-o", str(tmp_path / "q.safetensors"), "--method", "rtn",
                                   "--device", "cuda:0"])
    assert res.exit_code == 1
    assert "--device cuda:0: CUDA is not available" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_offload_dir_without_room_is_one_line_and_writes_nothing(tmp_path):
    """An --offload-dir without room for the cached activations fails in one line naming it (its file's blocks
    are reserved before mapping, ``memory.file_backed_empty``), not with a SIGBUS when a mapped page is written.
    The lack of room is real: the child's file size limit, below the first batch of activations (64 x 64 float32)."""
    import os
    import subprocess
    import sys

    offload, out = tmp_path / "offload", tmp_path / "q.safetensors"
    offload.mkdir()
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "from modelsurgery.cli.app import main\n"
            "sys.argv = ['surgery', *sys.argv[1:]]\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code, "quantize", str(MLP), "-o", str(out), "--calib", str(CALIB),
                        "--samples", "64", "--steps", "2", "--offload-dir", str(offload)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--offload-dir {offload}: no room for" in lines[0], r.stderr
    assert "(File too large)" in lines[0]
    assert list(offload.iterdir()) == [] and not out.exists() and sorted(tmp_path.iterdir()) == [offload]
