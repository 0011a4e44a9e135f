"""quantize_checkpoint end to end on the fixtures: fake/packed agreement, FlexRound vs RTN error,
skips, transformers interop for GPT-2's Conv1D, and bad input (one-line error, nothing written)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize import QuantizeOptions, dequantize_checkpoint, quantize_checkpoint
from modelsurgery.ops.quantize.packing import METADATA_KEY

ROOT = Path(__file__).resolve().parents[3]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
CNN = ROOT / "fixtures" / "digits" / "cnn_seed0.safetensors"
CALIB = ROOT / "fixtures" / "data" / "digits_calib.safetensors"
EVAL = ROOT / "fixtures" / "data" / "digits_eval.safetensors"


def mlp_logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The digits MLP written out by hand: 64-128-128-10 with ReLU."""
    h = torch.relu(x @ state["0.weight"].T + state["0.bias"])
    h = torch.relu(h @ state["2.weight"].T + state["2.bias"])
    return h @ state["4.weight"].T + state["4.bias"]


def test_fake_and_packed_dequantize_to_the_same_weights(tmp_path):
    common = {"bits": 3, "method": "flexround", "granularity": "group", "group_size": 16, "symmetric": False,
                  "calib": CALIB, "samples": 64, "params": {"steps": 20}, "default_skips": False}
    fake = quantize_checkpoint(MLP, tmp_path / "fake.safetensors", QuantizeOptions(format="fake", **common))
    packed = quantize_checkpoint(MLP, tmp_path / "packed.safetensors", QuantizeOptions(format="packed", **common))
    assert fake.layers == packed.layers and set(fake.layers) == {"0.weight", "2.weight", "4.weight"}
    f = load_file(tmp_path / "fake.safetensors")
    raw = load_file(tmp_path / "packed.safetensors")
    assert raw["2.weight.qweight"].dtype == torch.uint8 and raw["2.weight.qweight"].shape == (128, 128 * 3 // 8)
    assert raw["2.weight.scale"].shape == (128, 8) and raw["2.weight.zero_point"].dtype == torch.uint8
    d = dequantize_checkpoint(Checkpoint.open(tmp_path / "packed.safetensors"))
    assert set(d) == set(f)
    for name in f:
        assert torch.equal(d[name], f[name]), name
    # each fake weight row holds at most 2^3 distinct values per group of 16
    w = f["2.weight"].reshape(128, 8, 16)
    assert max(len(g.unique()) for g in w.reshape(-1, 16)) <= 8
    original = load_file(MLP)
    for b in ("0.bias", "2.bias", "4.bias"):
        assert torch.equal(f[b], original[b]) and torch.equal(raw[b], original[b])
    with safe_open(tmp_path / "packed.safetensors", "pt") as fh:
        scheme = json.loads(fh.metadata()[METADATA_KEY])
    assert scheme["format"] == "packed" and scheme["bits"] == 3 and scheme["group_size"] == 16
    assert scheme["layers"]["0.weight"] == {"shape": [128, 64], "bits": 3, "group_size": 16}


def test_flexround_reconstructs_better_than_rtn(tmp_path):
    x = load_file(CALIB)["inputs"]
    ref = mlp_logits(load_file(MLP), x)
    errors = {}
    for method, grid in (("rtn", "minmax"), ("rtn", "search"), ("flexround", None)):
        out = tmp_path / f"{method}-{grid}.safetensors"
        r = quantize_checkpoint(MLP, out, QuantizeOptions(bits=3, method=method, grid=grid, calib=CALIB,
                                                          samples=256, default_skips=False,
                                                          params={"steps": 150} if method != "rtn" else {}))
        errors[(method, grid)] = (mlp_logits(load_file(out), x) - ref).pow(2).mean().item()
        if method == "flexround":
            assert all(b["loss"] < b["rtn_loss"] for b in r.blocks)
    assert errors[("flexround", None)] < 0.7 * min(errors[("rtn", "minmax")], errors[("rtn", "search")])


def test_default_skips_keep_the_head_float_and_skip_patterns(tmp_path):
    r = quantize_checkpoint(MLP, tmp_path / "a.safetensors", QuantizeOptions(bits=4, method="rtn"))
    assert r.skipped == ["4.weight"] and set(r.layers) == {"0.weight", "2.weight"}
    out, original = load_file(tmp_path / "a.safetensors"), load_file(MLP)
    assert torch.equal(out["4.weight"], original["4.weight"])
    assert not torch.equal(out["0.weight"], original["0.weight"])
    r = quantize_checkpoint(MLP, tmp_path / "b.safetensors",
                            QuantizeOptions(bits=4, method="rtn", skip=["0.*"], default_skips=False))
    assert set(r.layers) == {"2.weight", "4.weight"}


def test_conv_network_with_eval(tmp_path):
    r = quantize_checkpoint(CNN, tmp_path / "c.safetensors", QuantizeOptions(
        bits=4, method="flexround", calib=CALIB, samples=64, params={"steps": 10}, eval=EVAL, format="packed"))
    conv = [n for n, e in r.layers.items() if len(e["shape"]) == 4]
    assert conv, r.layers
    assert r.evaluation["float"]["accuracy"] > 0.8
    assert abs(r.evaluation["quantized"]["accuracy"] - r.evaluation["float"]["accuracy"]) < 0.1
    d = dequantize_checkpoint(Checkpoint.open(tmp_path / "c.safetensors"))
    assert d[conv[0]].shape == tuple(r.layers[conv[0]]["shape"])


def test_gpt2_fake_output_loads_in_transformers(tmp_path):
    from tests.hf_tiny import load_hf, save_tiny_gpt2

    src = tmp_path / "gpt2"
    save_tiny_gpt2(src)
    r = quantize_checkpoint(src, tmp_path / "q", QuantizeOptions(bits=8, method="rtn", format="fake"))
    c_fc = next(n for n in r.layers if n.endswith("mlp.c_fc.weight"))
    assert r.layers[c_fc].get("transposed") is True
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = load_hf(src)(input_ids=ids).logits, load_hf(tmp_path / "q")(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    # Conv1D stores (in, out): per output channel = one scale per column
    packed = quantize_checkpoint(src, tmp_path / "p", QuantizeOptions(bits=4, method="rtn", format="packed"))
    shape = packed.layers[c_fc]["shape"]
    assert load_file(tmp_path / "p" / "model.safetensors")[c_fc + ".scale"].shape == (shape[1], 1)


def _listing(folder: Path) -> set:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("opts,message", [
    ({"bits": 9, "method": "rtn"}, r"--bits 9: expected a bit width from 2 to 8"),
    ({"bits": 1, "method": "rtn"}, r"--bits 1"),
    ({"bits": 4, "method": "rtn", "granularity": "group", "group_size": 7},
     r"tensor '0.weight': --group-size 7 does not divide its row length 64"),
    ({"bits": 4, "method": "rtn", "group_size": 16},  # per channel, without a word about the group size
     r"--group-size 16: applies to --granularity group, not to --granularity channel"),
    ({"bits": 4, "method": "flexround"}, r"--method flexround learns the rounding from data: pass --calib"),
    ({"bits": 4, "method": "nearest"}, r"--method nearest: expected one of"),
    ({"bits": 4, "method": "rtn", "format": "int4"}, r"--format int4"),
    # options that would otherwise be ignored
    ({"method": "rtn", "format": "packed", "gguf_tokenizer": "none"},
     r"--gguf-tokenizer none: only for --format gguf \(--format packed writes no tokenizer\)"),
    ({"method": "rtn", "offload_dir": Path("/tmp")}, r"--offload-dir /tmp: .* without --calib there are none"),
    ({"method": "rtn", "seq_len": 16},
     r"^--seq-len 16: it cuts calibration and evaluation samples, and without --calib or --eval there are none$"),
    ({"method": "rtn", "calib": CALIB, "seq_len": 16},
     r"^--seq-len 16: it cuts token samples, and \S*digits_calib.safetensors holds feature inputs, not token ids$"),
    ({"method": "flexround", "calib": CALIB, "eval": EVAL, "seq_len": 128, "params": {"steps": 1}},
     r"^--seq-len 128: it cuts token samples, and \S*digits_calib.safetensors holds feature inputs"),
    ({"method": "rtn", "eval": EVAL, "seq_len": 16}, r"^--seq-len 16: .* \S*digits_eval.safetensors holds feature"),
    # a learned method without data: the missing --calib is what to fix
    ({"method": "flexround", "seq_len": 64, "samples": 8}, r"^--method flexround learns the rounding from data"),
    ({"method": "rtn", "samples": 64},
     r"^--samples 64: it counts calibration samples, and without --calib there are none$"),
    ({"method": "rtn", "eval": EVAL, "params": {"batch_size": 8}},
     r"^--batch-size 8: it batches calibration samples, and without --calib there are none$"),
    ({"method": "rtn", "calib": CALIB, "seed": 3},
     r"^--seed 3: it orders the batches a learned method trains on; --method rtn trains nothing$"),
    ({"method": "rtn", "calib": CALIB, "low_memory": False},
     r"^--fast: it applies while a learned method trains a block; --method rtn trains nothing$"),
    ({"method": "rtn", "low_memory": True}, r"^--low-memory: it applies while a learned method trains a block"),
])
def test_bad_options_write_nothing(tmp_path, opts, message):
    before = _listing(tmp_path)
    with pytest.raises(SurgeryError, match=message):
        quantize_checkpoint(MLP, tmp_path / "out.safetensors", QuantizeOptions(**opts))
    assert _listing(tmp_path) == before


def test_calibration_that_does_not_fit_writes_nothing(tmp_path):
    bad = tmp_path / "narrow.safetensors"
    save_file({"inputs": torch.randn(8, 32)}, bad)
    tokens = tmp_path / "tokens.safetensors"
    save_file({"input_ids": torch.randint(0, 5, (8, 16))}, tokens)
    text = tmp_path / "calib.txt"
    text.write_text("some text\nmore text\n")
    before = _listing(tmp_path)
    for path, message in ((bad, r"narrow.safetensors: .*do not fit the mlp model"),
                          (tokens, r"tokens.safetensors: holds token ids but the mlp model takes feature inputs"),
                          (text, r"calib.txt is text; calibrating on text needs the model folder's tokenizer.json")):
        with pytest.raises(SurgeryError, match=message):
            quantize_checkpoint(MLP, tmp_path / "out.safetensors", QuantizeOptions(calib=path, params={"steps": 5}))
        with pytest.raises(SurgeryError, match=message):
            quantize_checkpoint(MLP, tmp_path / "out.safetensors", QuantizeOptions(method="rtn", eval=path))
    assert _listing(tmp_path) == before


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(SurgeryError, match="already exists"):
        quantize_checkpoint(MLP, out, QuantizeOptions(method="rtn"))
    assert out.read_bytes() == b"keep"
    quantize_checkpoint(MLP, out, QuantizeOptions(method="rtn", force=True))
    assert out.stat().st_size > 4


@pytest.mark.parametrize("fmt", ["fake", "packed"])
def test_nan_weight_is_refused_naming_the_tensor(tmp_path, fmt):
    """Issue #14 item 9: RTN turned one NaN weight into a NaN row (its group's scale) with exit 0."""
    state = load_file(str(ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"))
    state["2.weight"][3, 4] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(SurgeryError, match=r"tensor '2\.weight' holds 1 NaN/Inf value"):
        quantize_checkpoint(tmp_path / "nan.safetensors", tmp_path / "q.safetensors",
                            QuantizeOptions(method="rtn", format=fmt))
    assert {p.name for p in tmp_path.iterdir()} == {"nan.safetensors"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("grid", ["minmax", "search"])
@pytest.mark.parametrize("granularity,group_size,symmetric,transposed,storage",
                         [("channel", None, True, False, None), ("group", 4, False, False, None),
                          ("tensor", None, False, True, None), ("group", 4, True, False, "gptq")])
def test_every_quantizer_refuses_a_non_finite_value_anywhere(bad, grid, granularity, group_size, symmetric,
                                                             transposed, storage):
    """The quantizers find a NaN/Inf through the grid (every value enters its row's or group's min and
    max) instead of a pass over the weight: wherever the bad value sits, in every grid, granularity and
    layout, and where a deployment format's fp16 scale would clamp an Inf scale to 65504, the weight is
    refused and its bad values counted."""
    from modelsurgery.ops.quantize.base import all_methods
    from modelsurgery.ops.quantize.grids import QuantScheme

    scheme = QuantScheme(bits=3, granularity=granularity, group_size=group_size, symmetric=symmetric,
                         storage=storage)
    for method in all_methods():
        for where in [(0, 0), (5, 11), (7, 3)]:
            w = torch.randn(8, 12)
            w[where] = bad
            with pytest.raises(SurgeryError, match=r"tensor 'x\.weight' holds 1 NaN/Inf value\(s\) of 96"):
                method(w, scheme, transposed, grid, "x.weight")
        method(torch.randn(8, 12), scheme, transposed, grid, "x.weight")  # a finite weight is taken


def test_the_samples_actually_used_are_reported(tmp_path):
    """Issue #18 item 4: a calibration file shorter than --samples used what it had without saying so."""
    from modelsurgery.data import load_data

    held = len(load_data(CALIB))
    res = quantize_checkpoint(MLP, tmp_path / "q.safetensors",
                              QuantizeOptions(method="flexround", calib=CALIB, samples=held + 1000,
                                              params={"steps": 1}))
    assert res.options["samples"] == held + 1000 and res.options["samples_used"] == held
    res = quantize_checkpoint(MLP, tmp_path / "q2.safetensors",
                              QuantizeOptions(method="flexround", calib=CALIB, samples=7, params={"steps": 1}))
    assert res.options["samples_used"] == 7


def test_library_call_never_writes_over_its_calibration_data(tmp_path):
    """The output rules live in the operation, not only in the CLI: --calib is an input."""
    calib = tmp_path / "calib.safetensors"
    calib.write_bytes(CALIB.read_bytes())
    with pytest.raises(SurgeryError, match="calib.safetensors"):
        quantize_checkpoint(MLP, calib, QuantizeOptions(method="flexround", calib=calib, force=True,
                                                        params={"steps": 1}))
    assert calib.read_bytes() == CALIB.read_bytes()


@pytest.mark.parametrize("mask", [[[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0]],  # left padding (and one padding column)
                                  [[1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 0]]])  # gaps
def test_data_keeps_every_attended_token_of_left_padded_samples(tmp_path, mask):
    """Only trailing columns that no sample attends to are dropped: the kept columns are those up to the
    last 1 of the file's own attention mask (a cut at the longest sample's token count dropped the last
    tokens of left-padded samples)."""
    from modelsurgery.families import detect_family
    from modelsurgery.ops.quantize.operation import read_data
    from tests.hf_tiny import save_tiny_gpt2

    mask = torch.tensor(mask)
    ids = torch.where(mask.bool(), torch.arange(1, 13).reshape(2, 6), torch.zeros_like(mask))
    save_file({"input_ids": ids, "attention_mask": mask}, tmp_path / "left.safetensors")
    family = detect_family(Checkpoint.open(save_tiny_gpt2(tmp_path / "gpt2")))
    data = read_data(tmp_path / "left.safetensors", family, None, None, 128, None)
    assert torch.equal(data.input_ids, ids[:, :5]) and torch.equal(data.attention_mask, mask[:, :5])
    short = read_data(tmp_path / "left.safetensors", family, None, None, 4, None)  # --seq-len still cuts
    assert torch.equal(short.input_ids, ids[:, :4])


@pytest.mark.parametrize("method", ["rtn", "flexround"])
def test_provenance_records_the_grid_and_samples_used(tmp_path, method):
    """The provenance names the grid the weights started from (not null when --grid is left out) and the samples
    used: quantizing again with the recorded grid gives the same weights, with the other grid different ones."""
    from modelsurgery.data import load_data

    held = len(load_data(CALIB))
    common = {"method": method, "calib": CALIB, "samples": held + 5, "params": {"steps": 0} if method != "rtn" else {}}
    quantize_checkpoint(MLP, tmp_path / "q.safetensors", QuantizeOptions(**common))
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["modelsurgery"])["parameters"]
    assert recorded["grid"] == {"rtn": "minmax", "flexround": "search"}[method] and recorded["samples_used"] == held
    other = {"minmax": "search", "search": "minmax"}[recorded["grid"]]
    for grid, same in ((recorded["grid"], True), (other, False)):
        quantize_checkpoint(MLP, tmp_path / f"{grid}.safetensors", QuantizeOptions(**common, grid=grid))
        assert torch.equal(load_file(tmp_path / f"{grid}.safetensors")["0.weight"],
                           load_file(tmp_path / "q.safetensors")["0.weight"]) == same
    if method == "rtn":  # without calibration data no sample count was used
        quantize_checkpoint(MLP, tmp_path / "nodata.safetensors", QuantizeOptions(method="rtn"))
        with safe_open(str(tmp_path / "nodata.safetensors"), "pt") as f:
            recorded = json.loads(f.metadata()["modelsurgery"])["parameters"]
        assert recorded["samples"] is None and "samples_used" not in recorded
    assert recorded["seq_len"] is None  # no token data was cut
    # RTN draws no batches and trains nothing; a learned method records the seed and memory mode it used
    assert (recorded["seed"], recorded["low_memory"]) == ((None, None) if method == "rtn" else (0, True))


def test_provenance_records_the_signed_step_used(tmp_path):
    """flexround-signsgd's lr 0 means 2^(2 - bits) / sqrt(50 x steps) (its declaration, README): the provenance
    records that value, not the 0, and passing it as --lr gives the same bytes."""
    common = {"method": "flexround-signsgd", "bits": 3, "calib": CALIB, "samples": 64}
    quantize_checkpoint(MLP, tmp_path / "q.safetensors", QuantizeOptions(**common, params={"steps": 8}))
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        lr = json.loads(f.metadata()["modelsurgery"])["parameters"]["params"]["lr"]
    assert lr == pytest.approx(2.0 ** (2 - 3) / math.sqrt(50 * 8), rel=1e-12)
    quantize_checkpoint(MLP, tmp_path / "given.safetensors", QuantizeOptions(**common, params={"steps": 8, "lr": lr}))
    a, b = load_file(tmp_path / "q.safetensors"), load_file(tmp_path / "given.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seq_len_cuts_token_calibration(tmp_path):
    """--seq-len N on token data calibrates on the first N tokens of each sample: the blocks' errors are those
    of the file cut to N columns by hand (other lengths give others), and the provenance records N; left out,
    the default 128 is recorded, as before it was refused for data it does not apply to."""
    from tests.hf_tiny import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama")
    ids = torch.randint(3, 97, (8, 24), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "full.safetensors")
    save_file({"input_ids": ids[:, :6].contiguous()}, tmp_path / "cut.safetensors")
    runs = {"flag": ("full", 6), "by_hand": ("cut", None), "longer": ("full", 12), "default": ("full", None)}
    losses = {}
    for run, (calib, seq_len) in runs.items():
        r = quantize_checkpoint(folder, tmp_path / run, QuantizeOptions(
            method="rtn", calib=tmp_path / f"{calib}.safetensors", seq_len=seq_len, format="packed"))
        losses[run] = [b["rtn_loss"] for b in r.blocks]
        with safe_open(str(tmp_path / run / "model.safetensors"), "pt") as f:
            recorded = json.loads(f.metadata()["modelsurgery"])["parameters"]["seq_len"]
        assert recorded == (seq_len or 128), run
    assert len(losses["flag"]) == 3 and all(x > 0 for x in losses["flag"])
    assert losses["flag"] == losses["by_hand"]
    assert losses["flag"] != losses["longer"] and losses["longer"] != losses["default"]


@pytest.mark.parametrize("seq_len", [10, 128])
def test_eval_token_labels_are_cut_with_their_tokens(tmp_path, seq_len):
    """--eval data with [N, T] labels, cut by --seq-len or to the last attended column, is scored as transformers
    scores it (its loss with -100 on the targets left out); the labels kept their full width and the scoring
    raised a traceback."""
    from tests.hf_tiny import load_hf, save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama")
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (4, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    mask[:, 15:] = 0
    save_file({"input_ids": ids, "labels": labels, "attention_mask": mask}, tmp_path / "eval.safetensors")
    r = quantize_checkpoint(folder, tmp_path / "q", QuantizeOptions(method="rtn", eval=tmp_path / "eval.safetensors",
                                                                      seq_len=seq_len))
    width = min(seq_len, 15)  # no sample attends beyond column 15
    ids, mask, labels = ids[:, :width], mask[:, :width], labels[:, :width].masked_fill(mask[:, :width] == 0, -100)
    with torch.no_grad():
        expected = load_hf(folder)(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert r.evaluation["float"]["loss"] == pytest.approx(expected, rel=1e-5)


def test_skip_takes_module_names_as_transformers_names_layers(tmp_path):
    """--skip with a module name as transformers' named_modules() gives it (the form of its modules_to_not_convert
    and llm-compressor's ignore list), a glob on it, or a run of its parts keeps exactly those weights float; such a
    pattern matched nothing and the layer was quantized without a word."""
    from tests.hf_tiny import load_hf, save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama")
    linears = [n for n, m in load_hf(folder).named_modules() if isinstance(m, torch.nn.Linear)]
    one = next(n for n in linears if n.endswith("layers.1.mlp.down_proj"))
    for i, (pattern, expected) in enumerate([
            (one, {one}),
            ("*.down_proj", {n for n in linears if n.endswith(".down_proj")}),
            ("mlp.down_proj", {n for n in linears if n.endswith(".down_proj")}),
            ("layers.1", {n for n in linears if ".layers.1." in n})]):
        r = quantize_checkpoint(folder, tmp_path / f"q{i}", QuantizeOptions(method="rtn", skip=[pattern]))
        assert {n.removesuffix(".weight") for n in r.skipped} - {"model.embed_tokens", "lm_head"} == expected, pattern
        assert {k["name"].removesuffix(".weight") for k in r.kept_float if k["reason"] == f"--skip {pattern}"} \
            == expected


@pytest.mark.parametrize("kind", ["bitsandbytes", "int8 codes", "packed"])
def test_quantized_input_is_refused_naming_it(tmp_path, kind):
    """Another tool's int8 codes under the float names (bitsandbytes: .SCB scales, a quantization_config), int8
    weights alone, or a packed checkpoint: one line, nothing written. The codes were taken as float weights,
    rounded again and written back as int8."""
    import json as _json

    from tests.hf_tiny import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama")
    if kind == "packed":
        src = tmp_path / "packed"
        quantize_checkpoint(folder, src, QuantizeOptions(method="rtn", format="packed"))
        message = "packed 4-bit quantized checkpoint"
    else:
        src = tmp_path / "int8"
        src.mkdir()
        state = load_file(folder / "model.safetensors")
        name = "model.layers.0.mlp.down_proj.weight"
        absmax = state[name].abs().amax(1)
        state[name] = torch.round(state[name] / absmax[:, None] * 127).to(torch.int8)
        config = _json.loads((folder / "config.json").read_text())
        if kind == "bitsandbytes":
            state[name.removesuffix("weight") + "SCB"] = absmax
            config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
        save_file(state, src / "model.safetensors")
        (src / "config.json").write_text(_json.dumps(config))
        message = "bitsandbytes" if kind == "bitsandbytes" else f"tensor '{name}' holds int8 codes, not float weights"
    with pytest.raises(SurgeryError, match=message) as e:
        quantize_checkpoint(src, tmp_path / "out", QuantizeOptions(method="rtn"))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    fake = tmp_path / "fake"  # fake-quantized weights are float: quantized again
    quantize_checkpoint(folder, fake, QuantizeOptions(method="rtn", bits=8))
    assert quantize_checkpoint(fake, tmp_path / "again", QuantizeOptions(method="rtn", bits=4)).layers


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fake_dtype_rounds_the_quantized_weights_once(tmp_path, streaming, dtype):
    """A bfloat16 model written with --dtype float32 (or float16) holds (q - z) * s rounded once to that dtype, as
    the same run's packed output dequantizes; the weights went through bfloat16 first."""
    from tests.hf_tiny import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama")
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, folder / "model.safetensors", {"format": "pt"})
    common = {"method": "rtn", "bits": 4, "streaming": streaming}
    quantize_checkpoint(folder, tmp_path / "fake", QuantizeOptions(dtype=dtype, **common))
    quantize_checkpoint(folder, tmp_path / "packed", QuantizeOptions(format="packed", **common))
    fake = load_file(tmp_path / "fake" / "model.safetensors")
    floats = dequantize_checkpoint(Checkpoint.open(tmp_path / "packed"))
    name = "model.layers.0.mlp.down_proj.weight"
    w = load_file(folder / "model.safetensors")[name].float()  # RTN by hand: symmetric, per output channel
    scale = 2 * w.abs().amax(1, keepdim=True) / 15
    by_hand = (torch.clamp(torch.round(w / scale) + 8, 0, 15) - 8) * scale
    assert torch.equal(floats[name], by_hand)
    for k, v in floats.items():
        assert fake[k].dtype == getattr(torch, dtype) and torch.equal(fake[k], v.to(fake[k].dtype)), k
