"""mergekit configs run as they are: output tensors against mergekit's documented semantics,
computed in tests/recipe/reference.py (float64 numpy, independently of modelsurgery's code)."""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.recipe import reference as ref

runner = CliRunner()

#: mergekit configs (as its README and docs write them), shared with the slow test against mergekit itself
SLERP = """
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
      - model: b
        layer_range: [0, 3]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""

PASSTHROUGH = """
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
  - sources:
      - model: b
        layer_range: [1, 3]
merge_method: passthrough
dtype: float32
"""

TIES = """
models:
  - model: base
  - model: ft1
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: ft2
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""

TASK_ARITHMETIC = """
models:
  - model: ft1
    parameters:
      weight: 0.7
  - model: ft2
    parameters:
      weight: -0.3
merge_method: task_arithmetic
base_model: base
parameters:
  lambda: 0.8
dtype: float32
out_dtype: bfloat16
"""

LINEAR = """
models:
  - model: a
    parameters:
      weight:
        - filter: mlp
          value: 0.8
        - value: 0.3
  - model: b
    parameters:
      weight: 1.0
merge_method: linear
"""


def materialize(config: str, models: dict) -> str:
    """The config with its model names replaced by the test's model folders."""
    for k, v in models.items():
        config = re.sub(rf"\b{k}\b(?=[\s,\]}}]|$)", str(v), config)
    return config


def run(tmp_path, config: str, models: dict, out_name: str = "out", extra: tuple = ()):
    recipe = tmp_path / "merge.yml"
    recipe.write_text(materialize(config, models))
    out = tmp_path / out_name
    r = runner.invoke(app, ["run", str(recipe), "-o", str(out), *extra])
    return r, out


def layer_of(name: str):
    m = re.search(r"(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def test_slerp_gradients_and_filters(tmp_path, llamas):
    """mergekit README's slerp example: t per layer from filtered gradients, default 0.5."""
    config = SLERP
    r, out = run(tmp_path, config, llamas)
    assert r.exit_code == 0, r.output
    a, b, got = ref.load(llamas["a"]), ref.load(llamas["b"]), ref.load(out)
    assert set(got) == set(a)
    conds = yaml.safe_load(config)["parameters"]["t"]
    ts = set()
    for name in a:
        i = layer_of(name)
        t = ref.filtered(conds, name, 0.0 if i is None else i / 2)
        ts.add(round(t, 6))
        np.testing.assert_allclose(got[name], ref.slerp(t, a[name], b[name]), atol=1e-5, err_msg=name)
    # gradient [0, .5, .3, .7, 1] at t = 0, 0.5, 1 gives 0, 0.3, 1; the other 1, 0.7, 0; the rest 0.5
    assert ts == {0.0, 0.3, 1.0, 0.7, 0.5}
    assert not np.allclose(got["model.layers.1.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])
    assert np.array_equal(got["model.layers.0.self_attn.q_proj.weight"].astype(np.float32),
                          a["model.layers.0.self_attn.q_proj.weight"].astype(np.float32))  # t = 0: the base


def test_passthrough_slices_frankenmerge(tmp_path, llamas):
    """Depth up-scaling: layers 0-1 of a then 1-2 of b; embeddings from the first slice's model,
    final norm and head from the last's; config.json counts 4 layers and transformers loads it."""
    config = PASSTHROUGH
    r, out = run(tmp_path, config, llamas)
    assert r.exit_code == 0, r.output
    a, b, got = ref.load(llamas["a"]), ref.load(llamas["b"]), ref.load(out)
    mapping = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (b, 2)}
    for name, value in got.items():
        i = layer_of(name)
        if i is None:
            src = a if "embed_tokens" in name else b
            np.testing.assert_array_equal(value, src[name], err_msg=name)
        else:
            model, j = mapping[i]
            np.testing.assert_array_equal(value, model[name.replace(f"layers.{i}.", f"layers.{j}.")], err_msg=name)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    from tests.hf_tiny import load_hf

    model = load_hf(out)
    assert len(model.model.layers) == 4
    torch.testing.assert_close(model.model.layers[2].mlp.down_proj.weight,
                               torch.from_numpy(b["model.layers.1.mlp.down_proj.weight"]).float())


def test_passthrough_scale_filter(tmp_path, llamas):
    """passthrough's per-model scale, filter-conditioned (mergekit docs: zero a projection to drop its block's
    contribution)."""
    config = """
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: [1, 0.5]
            - value: 1.0
merge_method: passthrough
"""
    r, out = run(tmp_path, config, llamas)
    assert r.exit_code == 0, r.output
    a, got = ref.load(llamas["a"]), ref.load(out)
    for name in a:
        i = layer_of(name)
        t = 0.0 if i is None else i / 2
        scale = 0.0 if "o_proj" in name else ref.gradient([1, 0.5], t) if "down_proj" in name else 1.0
        np.testing.assert_allclose(got[name], scale * a[name], atol=1e-7, err_msg=name)


def test_ties_density_weight_gradients_normalize(tmp_path, gpt2s):
    """TIES on GPT-2 with per-model density and weight (a gradient), normalize and int8_mask
    (int8_mask changes only the mask's dtype in mergekit, never the result)."""
    config = TIES
    r, out = run(tmp_path, config, gpt2s)
    assert r.exit_code == 0, r.output
    base, f1, f2 = ref.load(gpt2s["base"]), ref.load(gpt2s["ft1"]), ref.load(gpt2s["ft2"])
    got = ref.load(out)
    assert set(got) == set(base)
    for name in base:
        i = layer_of(name)
        t = 0.0 if i is None else i / 2
        expected = ref.ties(base[name], [f1[name], f2[name]],
                            [1.0, ref.gradient([0, 0.3, 0.7, 1], t)], [ref.gradient([1, 0.7, 0.1], t), 0.5])
        np.testing.assert_allclose(got[name], expected, atol=1e-5, err_msg=name)
    name = "transformer.h.2.mlp.c_fc.weight"
    assert not np.allclose(got[name], base[name]) and not np.allclose(got[name], f1[name])


@pytest.mark.parametrize(("edit", "settings"), [
    (("int8_mask: true", "rescale: true\n  lambda: 0.6"), {"lam": 0.6, "rescale": True}),
    # mergekit's ties with normalize: false: the elected-sign deltas are summed, not averaged
    (("normalize: true", "normalize: false"), {"normalize": False}),
])
def test_ties_rescale_lambda_and_normalize(tmp_path, llamas, edit, settings):
    config = TIES.replace(*edit)
    assert edit[1] in config
    r, out = run(tmp_path, config, llamas)
    assert r.exit_code == 0, r.output
    base, f1, f2, got = ref.load(llamas["base"]), ref.load(llamas["ft1"]), ref.load(llamas["ft2"]), ref.load(out)
    for name in base:
        i = layer_of(name)
        t = 0.0 if i is None else i / 2
        expected = ref.ties(base[name], [f1[name], f2[name]], [1.0, ref.gradient([0, 0.3, 0.7, 1], t)],
                            [ref.gradient([1, 0.7, 0.1], t), 0.5], **settings)
        np.testing.assert_allclose(got[name], expected, atol=1e-5, err_msg=name)


def test_task_arithmetic_lambda_out_dtype(tmp_path, llamas):
    """task_arithmetic: base + lambda * sum w_i (x_i - base), no normalisation by default; written as out_dtype."""
    config = TASK_ARITHMETIC
    r, out = run(tmp_path, config, llamas)
    assert r.exit_code == 0, r.output
    base, f1, f2 = ref.load(llamas["base"]), ref.load(llamas["ft1"]), ref.load(llamas["ft2"])
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in base:
            x = f.get_tensor(name)
            assert x.dtype == torch.bfloat16
            expected = base[name] + 0.8 * (0.7 * (f1[name] - base[name]) - 0.3 * (f2[name] - base[name]))
            want = torch.from_numpy(expected).to(torch.bfloat16)
            assert torch.equal(x, want) or torch.allclose(x.float(), want.float(), rtol=1e-2, atol=1e-3), name


def test_linear_filtered_weights(tmp_path, llamas):
    """linear: per-model weight as filter-conditioned list, normalised by the weight sum."""
    config = LINEAR
    r, out = run(tmp_path, config, llamas)
    assert r.exit_code == 0, r.output
    a, b, got = ref.load(llamas["a"]), ref.load(llamas["b"]), ref.load(out)
    for name in a:
        wa = 0.8 if "mlp" in name else 0.3
        np.testing.assert_allclose(got[name], (wa * a[name] + b[name]) / (wa + 1.0), atol=1e-6, err_msg=name)


def test_exponent_numbers_as_mergekit_reads_them(tmp_path, llamas):
    """YAML 1.1 reads 1e-1 (no dot) as a string; mergekit's config (pydantic) reads it as the number 0.1."""
    config = ("models:\n  - model: a\n    parameters: {weight: 1e-1}\n  - model: b\n    parameters:\n"
              "      weight: [{filter: mlp, value: 3e-1}, {value: 1}]\nmerge_method: linear\n")
    r, out = run(tmp_path, config, llamas)
    assert r.exit_code == 0, r.output
    a, b, got = ref.load(llamas["a"]), ref.load(llamas["b"]), ref.load(out)
    for name in a:
        wb = 0.3 if "mlp" in name else 1.0
        np.testing.assert_allclose(got[name], (0.1 * a[name] + wb * b[name]) / (0.1 + wb), atol=1e-6, err_msg=name)


def test_tokenizer_source_base_and_union(tmp_path, fixtures_dir):
    import shutil

    base = tmp_path / "m1"
    shutil.copytree(fixtures_dir / "charlm" / "llama", base)
    other = tmp_path / "m2"
    shutil.copytree(fixtures_dir / "charlm" / "llama", other)
    config = """
models:
  - model: first
    parameters: {weight: 0.5}
  - model: second
    parameters: {weight: 0.5}
merge_method: linear
base_model: first
tokenizer_source: union
"""
    models = {"first": base, "second": other}
    r, out = run(tmp_path, config, models)
    assert r.exit_code == 0, r.output  # same vocabulary: union is the base's tokenizer
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["zz-new"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    r, out2 = run(tmp_path, config, models, out_name="out2")
    assert r.exit_code == 1 and "tokenizer_source: union" in r.output and "m2" in r.output
    assert not out2.exists()
    # base: mergekit gives each model's embedding rows the base's token ids (a model's own row for a token it has,
    # the base's row for one it lacks) before merging; rows merged by index would mix two different tokens
    r, out3 = run(tmp_path, config.replace("union", "base"), models, out_name="out3")
    assert r.exit_code == 1 and "tokenizer_source: base" in r.output and "m2" in r.output
    assert not out3.exists()
    shutil.copy(base / "tokenizer.json", other / "tokenizer.json")
    r, out4 = run(tmp_path, config.replace("union", "base"), models, out_name="out4")
    assert r.exit_code == 0, r.output
    assert (out4 / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("config, named", [
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: linear\nchat_template: chatml\n", "chat_template"),
    ("models: [{model: a}, {model: b}]\nmerge_method: dare_ties\nbase_model: a\n", "dare_ties"),
    ("models: [{model: a}, {model: b}]\nmerge_method: model_stock\nbase_model: a\n", "model_stock"),
    ("models: [{model: a, parameters: {weight: 1, gamma: 0.1}}]\nmerge_method: linear\n", "gamma"),
    ("slices: [{sources: [{model: a, layer_range: [0, 2]}], residual_weight: 0.1}]\nmerge_method: passthrough\n",
     "residual_weight"),
    ("modules: {}\nmerge_method: linear\n", "modules"),
    ("models: [{model: a}, {model: b}]\nmerge_method: slerp\nbase_model: a\n", "'t'"),
    ("models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\n"
     "merge_method: linear\ntokenizer_source: a\n", "tokenizer_source"),
    ("slices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]\n"
     "merge_method: linear\n", "same number of layers"),
    ("slices: [{sources: [{model: a, layer_range: [0, 7]}]}]\nmerge_method: passthrough\n", "layer_range"),
    ("models: [{model: a, parameters: {weight: {value: 1}}}]\nmerge_method: linear\n", "weight"),
    ("models: [{model: org/hub-model, parameters: {weight: 1}}]\nmerge_method: linear\n", "org/hub-model"),
    ("models: [{model: a+lora, parameters: {weight: 1}}]\nmerge_method: linear\n", "+lora"),
    ("models: [{model: a, parameters: {weight: 1}}, {model: deep, parameters: {weight: 1}}]\nmerge_method: linear\n",
     "same number of layers"),
    ("models: [{model: a, parameters: {weight: 1}}]\nbase_model: b\nmerge_method: linear\n", "has no weight"),
    # a model twice in one slice (two of its layer ranges): inputs are keyed by model, one would be dropped
    ("slices: [{sources: [{model: a, layer_range: [0, 2], parameters: {weight: 1}}, "
     "{model: a, layer_range: [1, 3], parameters: {weight: 1}}]}]\nmerge_method: linear\n", "listed twice"),
    ("models: [{model: a, parameters: {weight: 1}}, {model: a, parameters: {weight: 2}}]\nmerge_method: linear\n",
     "listed twice"),
    # a NaN or infinite parameter would make every merged value NaN
    ("models: [{model: a, parameters: {weight: .nan}}, {model: b, parameters: {weight: 1}}]\nmerge_method: linear\n",
     "nan is not a finite number"),
    ("models: [{model: a, parameters: {weight: [0, .inf]}}, {model: b, parameters: {weight: 1}}]\n"
     "merge_method: linear\n", "inf is not a finite number"),
    # a tensor only a later model has (an untied head next to a tied one, biases) would be dropped from the output
    ("models: [{model: tied, parameters: {weight: 1}}, {model: a, parameters: {weight: 1}}]\nmerge_method: linear\n",
     "'lm_head.weight'"),
    ("models: [{model: a, parameters: {weight: 1}}, {model: biased, parameters: {weight: 1}}]\n"
     "merge_method: linear\n", "_proj.bias"),
])
def test_refused_in_one_line(tmp_path, llamas, config, named):
    from tests.hf_tiny import save_tiny_llama

    models = dict(llamas)
    for name, overrides in (("deep", {"num_hidden_layers": 4}), ("tied", {"tie_word_embeddings": True}),
                            ("biased", {"attention_bias": True})):
        if name in config:
            models[name] = save_tiny_llama(tmp_path / name, **overrides)
    r, out = run(tmp_path, config, models)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], r.output
    assert not out.exists()


def test_passthrough_slices_keep_each_layers_attention_type(tmp_path):
    """A Gemma 2 frankenmerge (layers 0-1 of a, then 1-2 of b; sliding window on alternate layers): each output
    layer attends as it did in its source model, so config.json's layer_types follow the sources
    (sliding, full, full, sliding), not the donor's pattern tiled. Reference: transformers running the source
    layers themselves, each with its own window, on a sequence longer than the window."""
    from tests.hf_tiny import load_hf, save_tiny_gemma2

    models = {"a": save_tiny_gemma2(tmp_path / "a", seed=0), "b": save_tiny_gemma2(tmp_path / "b", seed=1)}
    r, out = run(tmp_path, PASSTHROUGH, models)
    assert r.exit_code == 0, r.output
    src = {k: load_hf(v) for k, v in models.items()}
    types = [src[m].config.layer_types[i] for m, i in (("a", 0), ("a", 1), ("b", 1), ("b", 2))]
    assert types == ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    assert json.loads((out / "config.json").read_text())["layer_types"] == types
    reference = src["a"]
    layers = [src[m].model.layers[i] for m, i in (("a", 0), ("a", 1), ("b", 1), ("b", 2))]
    reference.model.layers = torch.nn.ModuleList(layers)
    reference.model.norm = src["b"].model.norm
    reference.config.num_hidden_layers, reference.config.layer_types = 4, types
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(input_ids=ids).logits, reference(input_ids=ids, use_cache=False).logits,
                                   atol=1e-5, rtol=1e-5)
    # b as a bare weights file (no config.json): its layers take the donor's attention types by index
    import shutil

    shutil.copy(models["b"] / "model.safetensors", tmp_path / "bare.safetensors")
    r, bare_out = run(tmp_path, PASSTHROUGH, {"a": models["a"], "b": tmp_path / "bare.safetensors"}, out_name="bare")
    assert r.exit_code == 0, r.output
    assert json.loads((bare_out / "config.json").read_text())["layer_types"] == types


def test_merging_a_sliding_layer_with_a_full_one_is_refused(tmp_path):
    """Layer 0 of a (sliding window) merged with layer 1 of b (full attention): no attention type is right for
    the result, so the run stops in one line naming the layers and writes nothing."""
    from tests.hf_tiny import save_tiny_gemma2

    models = {"a": save_tiny_gemma2(tmp_path / "a", seed=0), "b": save_tiny_gemma2(tmp_path / "b", seed=1)}
    config = ("slices: [{sources: [{model: a, layer_range: [0, 2], parameters: {weight: 1}}, "
              "{model: b, layer_range: [1, 3], parameters: {weight: 1}}]}]\nmerge_method: linear\n")
    r, out = run(tmp_path, config, models)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "layer_types" in lines[0] and "layer 1" in lines[0], r.output
    assert not out.exists()


def test_gradient_on_a_model_without_a_layer_stack_is_refused(tmp_path):
    """A Mixtral (no family here, so no layer stack): a gradient t: [0, 1] would put layer 2 at t = 1 in mergekit;
    without known layers every tensor sat at t = 0 and the output was the base model. Refused in one line naming
    the parameter; a scalar t still merges tensor by tensor (checked against the slerp definition by hand)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    models = {}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        MixtralForCausalLM(MixtralConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                         num_experts_per_tok=1, max_position_embeddings=32)
                           ).save_pretrained(tmp_path / name)
        models[name] = tmp_path / name
    config = "models: [{model: a}, {model: b}]\nmerge_method: slerp\nbase_model: a\nparameters: {t: %s}\n"
    r, out = run(tmp_path, config % "[0, 1]", models)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "'t'" in lines[0] and "layer" in lines[0], r.output
    assert not out.exists()
    r, out = run(tmp_path, "slices: [{sources: [{model: a, layer_range: [0, 2]}]}]\nmerge_method: passthrough\n",
                 models, out_name="sliced")
    assert r.exit_code == 1 and "no layer stack" in r.stderr and not out.exists(), r.output
    r, out = run(tmp_path, config % "0.25", models, out_name="scalar")
    assert r.exit_code == 0, r.output
    a, b, got = ref.load(models["a"]), ref.load(models["b"]), ref.load(out)
    name = "model.layers.1.self_attn.o_proj.weight"
    x, y = a[name].astype(np.float64).ravel(), b[name].astype(np.float64).ravel()
    w = np.arccos(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    want = (np.sin(0.75 * w) * a[name] + np.sin(0.25 * w) * b[name]) / np.sin(w)
    np.testing.assert_allclose(got[name], want, atol=1e-6)


@pytest.fixture(scope="module")
def inverse_idx_gpt2s(tmp_path_factory):
    """GPT-2s with scale_attn_by_inverse_layer_idx: block i divides its attention scores by i + 1."""
    from tests.hf_tiny import save_tiny_gpt2

    root = tmp_path_factory.mktemp("inverse_idx")
    return {n: save_tiny_gpt2(root / n, seed=s, scale_attn_by_inverse_layer_idx=True) for n, s in (("a", 0), ("b", 1))}


@pytest.mark.parametrize("config", [
    "slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n  - sources: [{model: a, layer_range: [1, 3]}]\n"
    "merge_method: passthrough\n",
    "slices:\n  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [1, 3]}]\n"
    "merge_method: linear\nparameters: {weight: 0.5}\n",
], ids=["passthrough-stack", "linear-offset"])
def test_moving_a_gpt2_block_under_inverse_layer_idx_is_refused(tmp_path, inverse_idx_gpt2s, config):
    """grow asks the family whether a block may change position (Family.check_layout); a mergekit slice moves
    blocks too: GPT-2's block 1 at position 2 would divide its scores by 3, not 2 (another model in
    transformers; in the linear merge, b's block 1 would sit at position 0). Refused in one line, nothing written."""
    r, out = run(tmp_path, config, inverse_idx_gpt2s)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "scale_attn_by_inverse_layer_idx" in lines[0], r.output
    assert re.search(r"block 1 at position (2|0)", lines[0]), lines[0]  # stacked: a's block 1 at 2; offset: b's at 0
    assert not out.exists()


def test_slices_keeping_gpt2_blocks_in_place_under_inverse_layer_idx_run_in_transformers(tmp_path, inverse_idx_gpt2s):
    """Blocks 0-1 of a and block 2 of b stay at their positions: allowed, and transformers computes what the
    same blocks assembled in transformers compute."""
    from transformers import GPT2LMHeadModel

    config = ("slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
              "  - sources: [{model: b, layer_range: [2, 3]}]\nmerge_method: passthrough\n")
    r, out = run(tmp_path, config, inverse_idx_gpt2s)
    assert r.exit_code == 0, r.output
    got = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    want = GPT2LMHeadModel.from_pretrained(inverse_idx_gpt2s["a"], attn_implementation="eager").eval()
    b = GPT2LMHeadModel.from_pretrained(inverse_idx_gpt2s["b"], attn_implementation="eager").eval()
    want.transformer.h[2] = b.transformer.h[2]
    want.transformer.ln_f = b.transformer.ln_f  # post-block tensors come from the last slice's model
    assert got.config.scale_attn_by_inverse_layer_idx
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-5)


def test_packed_checkpoints_are_merged_as_the_float_weights_they_stand_for(tmp_path, llamas):
    """modelsurgery's packed format (uint8 codes '.qweight', float '.scale', '.zero_point') read as it is gave A's
    codes with averaged scales and no quantization record. Read as `surgery merge` reads it: dequantized by the
    packed format's own reader, merged, written as float."""
    from modelsurgery.checkpoint import Checkpoint
    from modelsurgery.ops.quantize.operation import QuantizeOptions, quantize_checkpoint
    from modelsurgery.ops.quantize.packing import dequantize_checkpoint

    packed = {}
    for name in ("a", "b"):
        packed[name] = tmp_path / f"q{name}"
        quantize_checkpoint(llamas[name], packed[name], QuantizeOptions(bits=4, method="rtn", format="packed"))
    r, out = run(tmp_path, "models: [{model: a}, {model: b}]\nmerge_method: linear\nparameters: {weight: 0.5}\n",
                 packed)
    assert r.exit_code == 0, r.output
    fa, fb = (dequantize_checkpoint(Checkpoint.open(packed[n])) for n in ("a", "b"))
    got = Checkpoint.open(out)
    assert set(got.keys()) == set(fa)
    for k in fa:
        torch.testing.assert_close(got.get(k), (fa[k] + fb[k]) / 2, msg=k)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    notes = json.loads(got.metadata["modelsurgery"])["parameters"]["float_inputs"]
    assert len(notes) == 2 and all("dequantized to float32 for run" in n for n in notes)


def test_resnets_merge_with_their_blocks_in_place_and_refuse_slices_that_move_them(tmp_path, fixtures_dir):
    """A ResNet's blocks fit only where they are (stage widths and strides): the layout that keeps them all is the
    one its family accepts, so a plain merge runs and a slice that moves a block is refused."""
    from modelsurgery.checkpoint import Checkpoint

    models = {n: fixtures_dir / "digits" / f"resnet_seed{i}.safetensors" for n, i in (("a", 0), ("b", 1))}
    r, out = run(tmp_path, "models: [{model: a}, {model: b}]\nmerge_method: linear\nparameters: {weight: 0.5}\n",
                 models, out_name="m.safetensors")
    assert r.exit_code == 0, r.output
    a, b, got = (Checkpoint.open(p) for p in (models["a"], models["b"], out))
    name = "conv1.weight"
    torch.testing.assert_close(got.get(name), (a.get(name) + b.get(name)) / 2)
    r, out = run(tmp_path, "slices:\n  - sources: [{model: a, layer_range: [1, 2]}]\nmerge_method: passthrough\n",
                 models, out_name="s.safetensors")
    assert r.exit_code == 1 and "resnet" in r.stderr and not out.exists(), r.output


def _config_variant(src, dst, **changes):
    """A copy of the folder ``src`` (same weights) with ``changes`` in its config.json."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


LINEAR_AB = "models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\nmerge_method: linear\n"


@pytest.mark.parametrize("config", [LINEAR_AB, PASSTHROUGH], ids=["linear", "passthrough-slices"])
def test_sources_with_other_heads_refused(tmp_path, llamas, config):
    """Same shapes, another head count (8 heads of 4 instead of 4 of 8): merged or stacked under the donor's
    config.json, b's weights would compute another function. mergekit only compares architecture names; refused
    here in one line naming both config.json files, the key and both values, before anything is written."""
    models = {"a": llamas["a"], "b": _config_variant(llamas["b"], tmp_path / "b", num_attention_heads=8,
                                                      num_key_value_heads=4, head_dim=4)}
    r, out = run(tmp_path, config, models)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "num_attention_heads=8" in lines[0] and "num_attention_heads=4" in lines[0], r.output
    assert str(models["b"] / "config.json") in lines[0] and str(llamas["a"] / "config.json") in lines[0]
    assert not out.exists()


def test_sources_with_another_rope_base_noted_and_recorded(tmp_path, llamas):
    """A rope base (or eps, context length) fine-tunes may differ in on purpose: the run warns naming the key and
    both values, records them, and the output carries the donor's config.json, as mergekit's does."""
    models = {"a": llamas["a"], "b": _config_variant(
        llamas["b"], tmp_path / "b", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})}
    r, out = run(tmp_path, PASSTHROUGH, models)
    assert r.exit_code == 0, r.output
    assert "config.json rope_theta differs" in r.stderr and "500000.0" in r.stderr, r.stderr
    record = json.loads(safe_open(str(out / "model.safetensors"), "pt").metadata()["modelsurgery"])["parameters"]
    assert record["config_differences"]["rope_theta"] == {str(llamas["a"] / "config.json"): 10000.0,
                                                         str(models["b"] / "config.json"): 500000.0}
    assert record["config_from"] == str(llamas["a"] / "config.json")
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_theta"] == 10000.0
