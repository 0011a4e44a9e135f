"""Every operation on every transformer family (issue #12's parity suite).

One matrix, parametrised over ``FAMILIES``, so that a new family inherits every check (PEFT's lesson):
a random permutation keeps the function, stack loads in transformers with the new layer count,
interleave's identity copies keep the function, width growth keeps the function, RTN packed weights run
in ONNX Runtime as transformers runs the dequantized weights, and FlexRound runs.

The reference is always transformers' own model (``load_hf``), never our forward: the permuted, grown
or dequantized weights are loaded into transformers and compared with transformers on the original.
Sequences are longer than the sliding windows of Mistral and Gemma (5 tokens), so the window masks are
exercised; Gemma 2's soft-caps are in every forward.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.export import ExportOptions, export_checkpoint, ort_session
from modelsurgery.families import Family, Linear, detect_family
from modelsurgery.ops.align import find_classifier
from modelsurgery.ops.grow import GrowOptions, grow
from modelsurgery.ops.grow.common import GrowReport
from modelsurgery.ops.grow.width import WidthPlan, plan_groups
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.spec import PermutationSpec, apply_permutation
from modelsurgery.ops.match.weight_matching import weight_matching
from modelsurgery.ops.quantize.operation import QuantizeOptions, quantize_checkpoint
from modelsurgery.ops.quantize.packing import dequantize_checkpoint
from tests import hf_tiny
from tests.hf_tiny import load_hf

#: builder -> the family it must be detected as. A new family: one line here.
FAMILIES: dict[str, tuple[Callable[..., Path], str]] = {
    "gpt2": (hf_tiny.save_tiny_gpt2, "gpt2"),
    "llama": (hf_tiny.save_tiny_llama, "llama"),
    "bert": (hf_tiny.save_tiny_bert, "bert"),
    **{kind: (getattr(hf_tiny, f"save_tiny_{kind}"), fam) for kind, fam in hf_tiny.DECODER_FAMILY.items()},
}
KINDS = sorted(FAMILIES)
#: longer than every sliding window of the tiny configs (5)
SEQ = 9
VOCAB = 97


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return {}


def source(kind: str, sources: dict[str, Path], tmp_path_factory) -> Path:
    """The tiny checkpoint of ``kind`` (built once per module), skipped while its family is not detected."""
    if kind not in sources:
        make, family = FAMILIES[kind]
        folder = make(tmp_path_factory.mktemp(kind) / "src")
        found = detect_family(Checkpoint.open(folder)).name
        if found != family:
            pytest.skip(f"{kind}: detected as '{found}', the {family} family has not landed")
        sources[kind] = folder
    return sources[kind]


@pytest.fixture(params=KINDS)
def src(request, sources, tmp_path_factory) -> Path:
    """The checkpoint folder of each family in turn."""
    return source(request.param, sources, tmp_path_factory)


def ids(batch: int = 2, seq: int = SEQ, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_out(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' output on the checkpoint folder ``folder`` (its own loader, its own renames)."""
    model = load_hf(folder)
    with torch.no_grad():
        return model(input_ids=input_ids)[0]


_REFERENCE: dict[Path, torch.Tensor] = {}


def reference(folder: Path) -> torch.Tensor:
    """transformers' output on the source ``folder`` for ``ids()`` (computed once per source)."""
    if folder not in _REFERENCE:
        _REFERENCE[folder] = hf_out(folder, ids())
    return _REFERENCE[folder]


def write_folder(like: Path, state: dict[str, torch.Tensor], out: Path) -> Path:
    """``like``'s config with ``state`` as its weights, for transformers to load."""
    out.mkdir()
    shutil.copy(like / "config.json", out / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def is_encoder(folder: Path) -> bool:
    return detect_family(Checkpoint.open(folder)).output_kind != "logits"


def random_perms(spec: PermutationSpec, seed: int) -> dict:
    """Random permutations of every group; under RoPE (or shared per-head q/k norms) the q/k units within
    a head stay, whole heads move."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, grp in spec.groups.items():
        if grp.kind == "free":
            out[name] = {"p": torch.randperm(grp.size, generator=g)}
            continue
        within = [torch.randperm(grp.head_dim, generator=g) for _ in range(grp.size)]
        qk = torch.arange(grp.head_dim).repeat(grp.size, 1) if grp.rotary else torch.stack(within)
        vo = torch.stack([torch.randperm(grp.head_dim, generator=g) for _ in range(grp.size)])
        out[name] = {"heads": torch.randperm(grp.size, generator=g), "qk": qk, "vo": vo}
    return out


# ----- permutation ------------------------------------------------------------------------------
def test_permutation_preserves_outputs(src, tmp_path):
    folder = src
    ckpt = Checkpoint.open(folder)
    spec = permutation_spec(detect_family(ckpt))
    state = ckpt.state_dict()
    permuted = apply_permutation(state, spec, random_perms(spec, seed=0))
    moved = [k for k in spec.axes if not torch.equal(permuted[k], state[k])]
    assert moved, "the permutation changed no tensor"
    x = ids()
    permuted_folder = write_folder(folder, permuted, tmp_path / "permuted")
    torch.testing.assert_close(hf_out(permuted_folder, x), reference(folder), atol=1e-4, rtol=1e-4)


def test_permutation_moves_every_block_tensor_that_can_move(src):
    """Attention heads permute in every block (fused q|k|v, concatenated or per head, included); MLP
    units in every block; the residual stream in every decoder."""
    folder = src
    fam = detect_family(Checkpoint.open(folder))
    spec = permutation_spec(fam)
    assert sum(g.name.endswith(".mlp") for g in spec.groups.values()) == fam.num_layers
    assert ("residual" in spec.groups) == (not is_encoder(folder))
    heads = [g for g in spec.groups.values() if g.name.endswith(".heads")]
    assert len(heads) == fam.num_layers
    assert all(spec.tensors_of(g.name) for g in heads)


# ----- depth ------------------------------------------------------------------------------------
def test_stack_loads_in_transformers_with_the_new_layer_count(src, tmp_path):
    folder = src
    fam = detect_family(Checkpoint.open(folder))
    n = fam.num_layers
    out = tmp_path / "stacked"
    report = grow([folder], out, GrowOptions(method="stack", factor=2))
    assert report.layout == [i % n for i in range(2 * n)]
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.num_hidden_layers == 2 * n
    src_types = getattr(AutoConfig.from_pretrained(folder), "layer_types", None)
    if src_types is not None:  # each output block keeps its source block's attention type
        assert list(cfg.layer_types) == [src_types[i % n] for i in range(2 * n)]
    grown = hf_out(out, ids())
    assert grown.shape == reference(folder).shape and torch.isfinite(grown).all()


def test_interleave_identity_copies_keep_the_function(src, tmp_path):
    folder = src
    out = tmp_path / "interleaved"
    fam = detect_family(Checkpoint.open(folder))
    if not all(fam.output_projections(i) for i in range(fam.num_layers)):  # post-LN (BERT)
        with pytest.raises(SurgeryError, match="identity"):
            grow([folder], out, GrowOptions(method="interleave", every=1))
        assert not out.exists()
        return
    report = grow([folder], out, GrowOptions(method="interleave", every=1))
    assert report.function_preserving and len(report.layout) == 2 * fam.num_layers
    x = ids()
    torch.testing.assert_close(hf_out(out, x), reference(folder), atol=1e-5, rtol=1e-5)


# ----- width ------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [False, True], ids=["zero-fan-out", "net2net-split"])
def test_width_growth_keeps_the_function(src, tmp_path, split):
    folder = src
    out = tmp_path / "wide"
    report = grow([folder], out, GrowOptions(method="width", factor=1.5, split=split))
    assert report.width_after and all(report.width_after[k] > report.width_before[k] for k in report.width_after)
    x = ids()
    torch.testing.assert_close(hf_out(out, x), reference(folder), atol=1e-4, rtol=1e-4)


# ----- quantize and export ----------------------------------------------------------------------
def test_rtn_packed_runs_in_onnx_runtime_as_transformers_runs_the_dequantized_weights(src, tmp_path):
    folder = src
    packed = tmp_path / "packed"
    quantize_checkpoint(folder, packed, QuantizeOptions(bits=4, method="rtn", granularity="group", group_size=8,
                                                        format="packed"))
    onnx_path = tmp_path / "model.onnx"
    export_checkpoint(packed, onnx_path, ExportOptions(seq_len=SEQ))
    ckpt = Checkpoint.open(packed)
    deq = write_folder(folder, dequantize_checkpoint(ckpt), tmp_path / "dequantized")
    fam = detect_family(Checkpoint.open(deq))
    inputs = fam.example_inputs(batch=2, seq_len=SEQ + 3, generator=torch.Generator().manual_seed(4))
    got = ort_session(onnx_path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    model = load_hf(deq)
    with torch.no_grad():
        want = model(**inputs)[0].numpy()
    keep = inputs["attention_mask"].numpy().astype(bool)  # padded positions are not compared
    assert np.abs(got - want)[keep].max() < 1e-4


def test_flexround_runs(src, tmp_path):
    """Two FlexRound steps on every block (min-max grid: the grid search is not what this checks)."""
    folder = src
    calib = tmp_path / "calib.safetensors"
    save_file({"input_ids": ids(batch=4, seed=7)}, calib)
    out = tmp_path / "flex"
    result = quantize_checkpoint(folder, out, QuantizeOptions(bits=4, method="flexround", calib=calib, samples=4,
                                                              seq_len=SEQ, params={"steps": 2},
                                                              grid="minmax"))
    assert result is not None
    x = ids()
    y = hf_out(write_folder(folder, Checkpoint.open(out).state_dict(), tmp_path / "loaded"), x)
    assert torch.isfinite(y).all()


def test_soft_caps_are_in_the_onnx_graph(tmp_path, sources, tmp_path_factory):
    """Gemma 2 with soft-caps small enough to dominate (attention 0.5, logits 0.3): ONNX Runtime matches
    transformers, and transformers without the caps is far off, so the caps are in the graph."""
    source("gemma2", sources, tmp_path_factory)  # skips until the family lands
    folder = hf_tiny.save_tiny_gemma2(tmp_path / "capped", attn_logit_softcapping=0.5, final_logit_softcapping=0.3)
    onnx_path = tmp_path / "capped.onnx"
    export_checkpoint(folder, onnx_path, ExportOptions(seq_len=SEQ))
    x = ids(seq=SEQ + 3)
    mask = torch.ones_like(x)
    got = torch.from_numpy(ort_session(onnx_path).run(None, {"input_ids": x.numpy(),
                                                             "attention_mask": mask.numpy()})[0])
    want = hf_out(folder, x)
    assert want.abs().max() <= 0.3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    uncapped = tmp_path / "uncapped"
    shutil.copytree(folder, uncapped)
    cfg = AutoConfig.from_pretrained(uncapped)
    cfg.attn_logit_softcapping = cfg.final_logit_softcapping = None
    cfg.save_pretrained(uncapped)
    assert (hf_out(uncapped, x) - want).abs().max() > 0.1


# ----- a new family is one class: the operations need no change ---------------------------------
class ToyChain(Family):
    """A family no operation has heard of: a ReLU chain under its own tensor names."""

    name = "toy-chain"

    def chain_layers(self) -> list[Linear]:
        return [Linear("enc.w", "enc.b"), Linear("mid.w", "mid.b"), Linear("cls.w", "cls.b")]

    layers = chain_layers


def toy_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The toy model written out by hand."""
    h = torch.relu(x @ state["enc.w"].T + state["enc.b"])
    h = torch.relu(h @ state["mid.w"].T + state["mid.b"])
    return h @ state["cls.w"].T + state["cls.b"]


@pytest.fixture
def toy():
    g = torch.Generator().manual_seed(0)
    sizes = [(7, 5), (9, 7), (4, 9)]
    state = {}
    for name, (o, i) in zip(("enc", "mid", "cls"), sizes):
        state[f"{name}.w"] = torch.randn(o, i, generator=g, dtype=torch.float64)
        state[f"{name}.b"] = torch.randn(o, generator=g, dtype=torch.float64)
    return ToyChain(Checkpoint.from_state_dict(state)), state


def test_a_new_family_is_permuted_from_its_capabilities(toy):
    fam, state = toy
    spec = permutation_spec(fam)
    assert sorted(g.size for g in spec.groups.values()) == [7, 9]  # hidden units only; inputs and classes stay
    permuted = apply_permutation(state, spec, random_perms(spec, seed=1))
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(toy_forward(permuted, x), toy_forward(state, x))


def test_a_new_family_grows_wider_from_its_capabilities(toy):
    fam, state = toy
    plan = WidthPlan(fam.ckpt, GrowOptions(method="width"))
    report = GrowReport("width", [], "", fam.name)
    plan_groups(fam, plan, 2.0, split=True, gen=torch.Generator().manual_seed(0), report=report)
    grown = {t.name: t.load() for t in plan.planned()}
    assert grown["enc.w"].shape == (14, 5) and grown["mid.w"].shape == (18, 14) and grown["cls.w"].shape == (4, 18)
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(toy_forward(grown, x), toy_forward(state, x))


def test_a_new_family_names_its_classifier(toy):
    fam, _ = toy
    assert find_classifier(fam) == Linear("cls.w", "cls.b")


def test_weight_matching_undoes_a_random_permutation(src):
    """Weight matching of a model against a randomly permuted copy of itself finds permutations that
    bring the copy back exactly (objective: every matched tensor equal)."""
    folder = src
    ckpt = Checkpoint.open(folder)
    spec = permutation_spec(detect_family(ckpt))
    state = {k: v.double() for k, v in ckpt.state_dict().items()}
    permuted = apply_permutation(state, spec, random_perms(spec, seed=2))
    assert any(not torch.equal(permuted[k], state[k]) for k in spec.axes)
    result = weight_matching(state, permuted, spec, seed=0)
    back = apply_permutation(permuted, spec, result.perms)
    for name in spec.axes:
        torch.testing.assert_close(back[name], state[name], atol=1e-9, rtol=0)
