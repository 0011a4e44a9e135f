"""Issue #11 item 7: grown configs carry each source block's per-layer entries (attention type, sliding
window) to its output position. Checked by loading the grown folder in transformers (the independent
reader of config.json) and comparing its ``layer_types`` with the mapping written out by hand."""

import pytest
import torch
from transformers import AutoConfig

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.grow import GrowOptions, grow
from tests.hf_tiny import load_hf
from tests.ops.grow.helpers import hf_folder

F, S = "full_attention", "sliding_attention"
#: a deliberately non-uniform pattern (no period that tiling could reproduce)
PATTERN = [F, S, S, F]


@pytest.fixture
def llama_pattern(tmp_path):
    return hf_folder(tmp_path, "llama", num_hidden_layers=4, layer_types=PATTERN, sliding_window=3)


@pytest.mark.parametrize(("options", "expected"), [
    # --layers 1:3,0:2 -> source blocks [1, 2, 0, 1]
    (GrowOptions(method="stack", layers="1:3,0:2"), [S, S, F, S]),
    # --layers 2:4 -> [2, 3]
    (GrowOptions(method="stack", layers="2:4"), [S, F]),
    # interleave --every 2 -> [0, 1, 1', 2, 3, 3'] (primes: identity copies of the block before)
    (GrowOptions(method="interleave", every=2), [F, S, S, S, F, F]),
    # G_stack x2 -> [0, 1, 2, 3, 0, 1, 2, 3]
    (GrowOptions(method="stack", factor=2), [F, S, S, F, F, S, S, F]),
])
def test_grown_layer_types_follow_their_source_blocks(llama_pattern, tmp_path, options, expected):
    out = tmp_path / "out"
    grow([llama_pattern], out, options)
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.num_hidden_layers == len(expected)
    assert list(cfg.layer_types) == expected
    load_hf(out)  # transformers builds the grown model from the folder


def test_config_for_layout_is_generic_over_per_layer_lists(llama_pattern):
    """Every per-layer list moves, not just layer_types; lists of another length are left alone."""
    ckpt = Checkpoint.open(llama_pattern)
    cfg = {**ckpt.config, "no_rope_layers": [1, 0, 0, 1], "architectures": ["LlamaForCausalLM"]}
    fam = detect_family(Checkpoint.from_state_dict(ckpt.state_dict(), config=cfg))
    new = fam.config_for_layout([3, 3, 1])
    assert new["num_hidden_layers"] == 3
    assert new["layer_types"] == [F, F, S]
    assert new["no_rope_layers"] == [1, 1, 0]
    assert new["architectures"] == ["LlamaForCausalLM"]
    # config_for_layers(n) is the tiled special case (block j is block j mod L)
    assert fam.config_for_layers(6)["layer_types"] == [F, S, S, F, F, S]


def test_interleaved_identity_keeps_outputs_with_sliding_layers(llama_pattern, tmp_path):
    """The identity copy of a sliding-window block is an identity whatever its window: transformers'
    grown model (with its per-layer masks) computes what the source computes, at a sequence longer
    than the window."""
    out = tmp_path / "out"
    grow([llama_pattern], out, GrowOptions(method="interleave", every=2))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_hf(llama_pattern)(input_ids=ids).logits
        got = load_hf(out)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gemma2_slice_keeps_each_block_window(tmp_path):
    """Gemma 2's own alternating pattern (sliding, full, ...): a slice that starts on a full layer must
    start with a full layer, where tiling would restart the pattern with a sliding one."""
    from tests.hf_tiny import save_tiny_gemma2

    src = save_tiny_gemma2(tmp_path / "gemma2", num_hidden_layers=4)
    assert detect_family(Checkpoint.open(src)).name == "gemma2" or pytest.skip("gemma2 family not landed")
    assert list(AutoConfig.from_pretrained(src).layer_types) == [S, F, S, F]
    out = tmp_path / "out"
    grow([src], out, GrowOptions(method="stack", layers="1:4"))
    assert list(AutoConfig.from_pretrained(out).layer_types) == [F, S, F]
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(load_hf(out)(input_ids=ids).logits).all()
