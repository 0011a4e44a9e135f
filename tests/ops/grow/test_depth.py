"""Depth growth on transformers' own tiny models: layouts, config, carried files, and transformers loading
the result (the independent reference) with the same outputs as our family modules."""

import json

import pytest
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.grow import GrowOptions, grow
from tests.hf_tiny import load_hf
from tests.ops.grow.helpers import hf_folder, save_mlp, weights

LAYER_KEY = {"gpt2": "n_layer", "llama": "num_hidden_layers", "bert": "num_hidden_layers"}


def hf_output(folder, ids):
    with torch.no_grad():
        return load_hf(folder)(input_ids=ids)[0]


def ours_output(folder, ids):
    fam = detect_family(Checkpoint.open(folder))
    with torch.no_grad():
        return fam.build_module()(input_ids=ids)


def check_layout(src, out, layout, zeroed=frozenset()):
    fam_in = detect_family(Checkpoint.open(src))
    fam_out = detect_family(Checkpoint.open(out))
    a, b = weights(src), weights(out)
    assert fam_out.num_layers == len(layout)
    zero_names = set()
    for j in zeroed:
        for lin in fam_out.output_projections(j):
            zero_names.update(n for n in (lin.weight, lin.bias) if n)
    for name, value in b.items():
        where = fam_out.block_of(name)
        if where is None:
            assert torch.equal(value, a[name]), name  # embeddings, final norm, head: copied
            continue
        j, suffix = where
        source = fam_in.block_name(layout[j], suffix)
        if name in zero_names:
            assert not value.any(), name
        else:
            assert torch.equal(value, a[source]), (name, source)
    # every input tensor outside the blocks is there once, nothing else added
    outside_in = {n for n in a if fam_in.block_of(n) is None}
    assert outside_in == {n for n in b if fam_out.block_of(n) is None}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_stack_factor_layout_and_transformers_loads(tmp_path, kind):
    src = hf_folder(tmp_path, kind)
    out = tmp_path / "grown"
    report = grow([src], out, GrowOptions(method="stack", factor=2))
    assert report.layout == [0, 1, 2, 0, 1, 2]
    check_layout(src, out, report.layout)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[LAYER_KEY[kind]] == 6
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    theirs = hf_output(out, ids)
    assert torch.allclose(ours_output(out, ids), theirs, atol=1e-5)
    # a 6-block model is not the 3-block one
    assert not torch.allclose(theirs, hf_output(src, ids), atol=1e-3)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_stack_slices(tmp_path, kind):
    src = hf_folder(tmp_path, kind, **({"n_layer": 4} if kind == "gpt2" else {"num_hidden_layers": 4}))
    out = tmp_path / "up"
    report = grow([src], out, GrowOptions(method="stack", layers="0:3,1:4"))
    assert report.layout == [0, 1, 2, 1, 2, 3]
    check_layout(src, out, report.layout)
    ids = torch.randint(0, 97, (1, 5))
    assert torch.allclose(ours_output(out, ids), hf_output(out, ids), atol=1e-5)


def test_tied_embeddings_stay_tied(tmp_path):
    src = hf_folder(tmp_path, "gpt2")  # GPT-2 ties lm_head to wte; save_pretrained stores wte only
    out = tmp_path / "grown"
    grow([src], out, GrowOptions(method="stack", factor=3))
    assert set(weights(out)) - {n for n in weights(out) if ".h." in n} == \
        set(weights(src)) - {n for n in weights(src) if ".h." in n}
    model = load_hf(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("every", [1, 2, 3])
def test_interleave_preserves_function(tmp_path, kind, every):
    src = hf_folder(tmp_path, kind)
    out = tmp_path / "deeper"
    report = grow([src], out, GrowOptions(method="interleave", every=every))
    assert report.layers_after == 3 + 3 // every
    check_layout(src, out, report.layout, zeroed=set(report.identity_blocks))
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    before = hf_output(src, ids)
    after = hf_output(out, ids)
    assert torch.allclose(after, before, atol=1e-5)
    assert torch.allclose(ours_output(out, ids), after, atol=1e-5)


def test_interleave_refuses_post_norm(tmp_path):
    src = hf_folder(tmp_path, "bert")
    out = tmp_path / "x"
    with pytest.raises(SurgeryError, match="post-LN"):
        grow([src], out, GrowOptions(method="interleave", every=1))
    assert not out.exists()


def test_single_file_input_and_output(tmp_path):
    src = hf_folder(tmp_path, "llama")
    out = tmp_path / "grown.safetensors"
    report = grow([src / "model.safetensors"], out, GrowOptions(method="stack", factor=2))
    assert out.is_file()
    check_layout(src / "model.safetensors", out, report.layout)


@pytest.mark.parametrize("options,msg", [
    (GrowOptions(method="stack", factor=0.5), "factor 0.5"),
    (GrowOptions(method="stack", factor=1.5), "whole number"),
    (GrowOptions(method="stack", layers="0:2,2:9"), "out of range for a model with 3 blocks"),
    (GrowOptions(method="interleave", every=0), "--every 0"),
])
def test_bad_depth_input_writes_nothing(tmp_path, options, msg):
    src = hf_folder(tmp_path, "gpt2")
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=msg):
        grow([src], out, options)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src-gpt2"]


def test_stack_needs_blocks(tmp_path):
    src = save_mlp(tmp_path / "mlp.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(SurgeryError, match="no repeated blocks"):
        grow([src], out, GrowOptions(method="stack", factor=2))
    assert not out.exists()


def test_existing_output_refused(tmp_path):
    src = hf_folder(tmp_path, "gpt2")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SurgeryError, match="already exists"):
        grow([src], out, GrowOptions(method="stack", factor=2))
    assert list(out.iterdir()) == []


def test_sharded_input_and_output_byte_copies(tmp_path):
    """Raw byte copies read the right offsets from every shard, and the writer shards the output."""
    from modelsurgery.checkpoint import plan_copy, write_checkpoint

    src = hf_folder(tmp_path, "llama")
    ckpt = Checkpoint.open(src)
    sharded = tmp_path / "sharded"
    write_checkpoint(sharded, [plan_copy(ckpt, n) for n in ckpt], config=ckpt.config,
                     max_shard_size=20_000)
    assert len(list(sharded.glob("*.safetensors"))) > 3
    out = tmp_path / "grown"
    report = grow([sharded], out, GrowOptions(method="stack", factor=2, max_shard_size=30_000))
    assert len(list(out.glob("*.safetensors"))) > 3 and (out / "model.safetensors.index.json").is_file()
    check_layout(src, out, report.layout)


def test_gemma_identity_copy_zeroes_the_projection_inside_the_post_norm(tmp_path):
    """Gemma wraps each branch as post_norm(proj(...)) with a (1 + w) RMSNorm. Interleave zeroes the
    projections (o_proj, down_proj): RMSNorm(0) = 0 whatever the weight, so the copy adds nothing. Zeroing
    the post-norm weights instead would leave a scale of 1 and change the output (checked in transformers)."""
    from tests.hf_tiny import save_tiny_gemma2

    src = save_tiny_gemma2(tmp_path / "gemma2")
    fam = detect_family(Checkpoint.open(src))
    if fam.name != "gemma2":
        pytest.skip("gemma2 family not landed")
    zeroed = {lin.weight.split("layers.0.")[1] for lin in fam.output_projections(0)}
    assert zeroed == {"self_attn.o_proj.weight", "mlp.down_proj.weight"}
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "out"
    grow([src], out, GrowOptions(method="interleave", every=1))
    with torch.no_grad():
        want = load_hf(src)(input_ids=ids).logits
        torch.testing.assert_close(load_hf(out)(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        wrong = load_hf(out)
        for j in (1, 3, 5):  # the identity copies, made "identity" by zeroing their post-norm weights instead
            layer = wrong.model.layers[j]
            layer.self_attn.o_proj.weight.copy_(load_hf(src).model.layers[(j - 1) // 2].self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(load_hf(src).model.layers[(j - 1) // 2].mlp.down_proj.weight)
            layer.post_attention_layernorm.weight.zero_()
            layer.post_feedforward_layernorm.weight.zero_()
        assert (wrong(input_ids=ids).logits - want).abs().max() > 1e-2


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-residual", "sequential-residual"])
def test_gpt_neox_identity_copies_with_either_residual(tmp_path, parallel):
    """GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x)) (parallel) or two sequential pre-norm branches; zeroing
    dense and dense_4h_to_h (weights and biases) makes the copy an identity either way (transformers)."""
    from tests.hf_tiny import save_tiny_gpt_neox

    src = save_tiny_gpt_neox(tmp_path / "neox", use_parallel_residual=parallel)
    if detect_family(Checkpoint.open(src)).name != "gpt_neox":
        pytest.skip("gpt_neox family not landed")
    out = tmp_path / "out"
    grow([src], out, GrowOptions(method="interleave", every=2))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(input_ids=ids).logits, load_hf(src)(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [GrowOptions(method="interleave", every=1), GrowOptions(method="stack", factor=2),
                                     GrowOptions(method="stack", layers="1:3")])
def test_gpt2_attention_scaled_by_layer_index_is_not_moved(tmp_path, options):
    """GPT-2 with scale_attn_by_inverse_layer_idx divides block i's attention scores by i + 1 (transformers'
    GPT2Attention), so a block copied to another position computes another function: an identity copy
    then shifts the blocks after it and the "function-preserving" interleave is not (seen in transformers).
    Depth growth that moves a block is refused naming the key; nothing is written."""
    src = hf_folder(tmp_path, "gpt2", scale_attn_by_inverse_layer_idx=True)
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=r"scale_attn_by_inverse_layer_idx=true.*block 0 at position 1"
                       if options.method == "interleave" else "scale_attn_by_inverse_layer_idx=true"):
        grow([src], out, options)
    assert not out.exists()


def test_gpt2_attention_scaled_by_layer_index_keeps_blocks_that_stay(tmp_path):
    """A slice that keeps every block at its position (dropping the last ones) is allowed: transformers
    runs it as it runs the source's first two blocks."""
    from transformers import AutoModelForCausalLM

    src = hf_folder(tmp_path, "gpt2", scale_attn_by_inverse_layer_idx=True)
    out = tmp_path / "out"
    grow([src], out, GrowOptions(method="stack", layers="0:2"))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    want_model = AutoModelForCausalLM.from_pretrained(src, n_layer=2, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_output(out, ids), want_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [GrowOptions(method="stack", factor=2), GrowOptions(method="stack", layers="0:2"),
                                     GrowOptions(method="stack", layers="1:3,1:3")])
def test_resnet_depth_growth_is_refused_in_one_line(tmp_path, fixtures_dir, options):
    """A ResNet's blocks change width and stride from stage to stage, and their names (layer{s}.{j}) hold
    no position beyond the model's: stacking them is refused naming the family, not an IndexError."""
    out = tmp_path / "out.safetensors"
    with pytest.raises(SurgeryError, match="resnet"):
        grow([fixtures_dir / "digits" / "resnet_seed0.safetensors"], out, options)
    assert not out.exists()


@pytest.mark.parametrize("options,flag", [
    (GrowOptions(method="interleave", factor=4), "--factor"),
    (GrowOptions(method="stack", every=2), "--every"),
    (GrowOptions(method="stack", split=True), "--split"),
    (GrowOptions(method="width", layers="0:2"), "--layers"),
    (GrowOptions(method="interleave", init_scale=0.5), "--init-scale"),
    (GrowOptions(method="stack", coef_scale=0.0), "--coef-scale"),
])
def test_an_option_of_another_method_is_refused(tmp_path, options, flag):
    """An option the method does not read would be ignored: --method interleave --factor 4 would make the
    model twice as deep, not four times. Refused naming the option and the methods that read it."""
    src = hf_folder(tmp_path, "llama")
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=f"{flag} applies to --method .*, not to --method {options.method}"):
        grow([src], out, options)
    assert not out.exists()


@pytest.mark.parametrize("options", [GrowOptions(method="stack", factor=2), GrowOptions(method="interleave", every=1)])
def test_a_gap_in_the_block_numbering_is_refused(tmp_path, options):
    """Blocks 0, 1, 3 (block 2's tensors missing, as left by a layer-dropping tool that did not renumber): depth
    growth addresses blocks by position, so it was a KeyError traceback; now one line naming the gap."""
    from safetensors.torch import save_file

    src = hf_folder(tmp_path, "llama", num_hidden_layers=4)
    kept = {k: v for k, v in weights(src).items() if ".layers.2." not in k}
    save_file(kept, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=r"block 2 is missing \(blocks found: 0, 1, 3\)"):
        grow([src], out, options)
    assert not out.exists()


def test_a_file_output_says_the_grown_config_was_not_written(tmp_path):
    """A single-file output has no place for config.json: the grown layer count (and layer types) are not
    written anywhere, and the source's config.json no longer fits the file; the report says so."""
    src = hf_folder(tmp_path, "llama")
    report = grow([src], tmp_path / "out.safetensors", GrowOptions(method="stack", factor=2))
    assert any("config.json" in note and "folder" in note for note in report.notes)
    report = grow([src], tmp_path / "out", GrowOptions(method="stack", factor=2))
    assert not any("config.json" in note for note in report.notes)


def test_gpt2_config_with_both_layer_count_spellings(tmp_path):
    """A GPT-2 config.json holding num_hidden_layers beside n_layer (transformers maps one onto the other): the
    grown count goes into both, or transformers reads the stale one and silently drops the stacked blocks."""
    src = hf_folder(tmp_path, "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = cfg["n_layer"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    grow([src], out, GrowOptions(method="stack", factor=2))
    assert len(load_hf(out).transformer.h) == 2 * cfg["n_layer"]
