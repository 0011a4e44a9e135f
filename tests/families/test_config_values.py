"""config.json type confusion (issue #14 item 13): every value a family reads is checked before use, so a
wrong type or range is one SurgeryError naming the key, never a TypeError/ZeroDivisionError mid-build."""

import json
import random
from pathlib import Path

import pytest

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "charlm"
HOSTILE = [0, -1, "abc", None, 1e308, float("nan"), float("inf"), [], {}, True, 2.5, 10**30, 3, ["x"],
           {"rope_type": 5}]
READ_KEYS = ["num_attention_heads", "num_key_value_heads", "head_dim", "n_head", "n_embd", "rms_norm_eps",
             "rope_theta", "hidden_act", "tie_word_embeddings", "rope_scaling", "layer_norm_epsilon", "layer_types",
             "sliding_window", "model_type", "architectures", "activation_function"]


def build(state, config):
    family = detect_family(Checkpoint.from_state_dict(state, path="x.safetensors", config=config))
    if family.runnable:
        family.build_module()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hostile_config_values_are_one_line_errors(kind):
    folder = FIXTURES / kind
    config = json.loads((folder / "config.json").read_text())
    state = Checkpoint.open(folder).state_dict()
    rng = random.Random(kind)
    for _ in range(150):
        cfg = dict(config)
        for key in rng.sample(sorted(cfg), 2) + rng.sample(READ_KEYS, 2):
            cfg[key] = rng.choice(HOSTILE)
        try:
            build(state, cfg)
        except SurgeryError as e:
            assert "\n" not in str(e)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("num_attention_heads", 0, "num_attention_heads=0 is not valid (expected a whole number >= 1)"),
    ("num_attention_heads", "abc", "num_attention_heads='abc' is not valid"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps=nan is not valid (expected a finite number > 0)"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings='yes' is not valid (expected true or false)"),
    ("model_type", ["llama"], "model_type is not a string"),
    ("head_dim", 10**30, "does not match tensor 'model.layers.0.self_attn.o_proj.weight'"),
])
def test_named_key_in_the_message(key, value, expected):
    folder = FIXTURES / "llama"
    config = json.loads((folder / "config.json").read_text()) | {key: value}
    with pytest.raises(SurgeryError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        build(Checkpoint.open(folder).state_dict(), config)
