"""`fold_adapters` against PEFT's own merge_and_unload() (peft/tuners/lora, miss, lokr) on tiny GPT-2,
LLaMA and BERT models written by transformers: the folded checkpoint, run by transformers, gives the
logits (BERT: hidden states) of PEFT's merged model within 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoKrConfig, LoraConfig, MissConfig
from safetensors import safe_open

from modelsurgery.ops.adapters import FoldOptions, fold_adapters
from tests.hf_tiny import load_hf
from tests.ops.adapters.peft_helpers import build, make_adapter, outputs, peft_merged

GPT2_ALL = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_ALL = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

CASES = {
    # GPT-2's Conv1D weights are stored (in, out): PEFT folds them with fan_in_fan_out
    "gpt2-lora-patterns": ("gpt2", lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=GPT2_ALL, fan_in_fan_out=True, rank_pattern={"c_fc": 2, "h.1.attn.c_attn": 6},
        alpha_pattern={"mlp.c_proj": 3}, bias="lora_only")),
    "gpt2-lora-rslora-lora_bias": ("gpt2", lambda: LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_rslora=True, lora_bias=True,
        bias="lora_only")),  # the trained bias is loaded, then lora_B.bias is added to it
    "gpt2-lora-embedding": ("gpt2", lambda: LoraConfig(r=4, target_modules=["wte", "c_fc"], fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", lambda: LoraConfig(r=4, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                                             use_dora=True)),
    "llama-lora-patterns-modules_to_save": ("llama", lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_ALL, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3}, modules_to_save=["lm_head"])),
    "llama-dora": ("llama", lambda: LoraConfig(r=4, target_modules=LLAMA_ALL, use_dora=True)),
    # VeLoRA and MonteCLoRA change training only: PEFT merges B A; their extra saved tensors are not weights
    "llama-velora": ("llama", lambda: LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                 velora_config={"num_groups": 4, "init_type": "random"})),
    "llama-monteclora": ("llama", lambda: LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                     monteclora_config={})),
    # MiCA freezes B at init; layers_to_transform / exclude_modules leave modules out of the adapter
    "llama-mica-layers_to_transform": ("llama", lambda: LoraConfig(
        r=4, target_modules=LLAMA_ALL, init_lora_weights="mica", layers_to_transform=[0, 2], layers_pattern="layers",
        exclude_modules=["model.layers.2.self_attn.q_proj"])),
    "llama-miss": ("llama", lambda: MissConfig(r=6, target_modules=LLAMA_ALL)),  # 56 = 9*6 + 2: a partial shard
    "llama-miss-bat": ("llama", lambda: MissConfig(r=4, target_modules=["q_proj", "o_proj", "gate_proj"],
                                                   init_weights="bat")),
    "llama-miss-mini": ("llama", lambda: MissConfig(r=4, mini_r=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                    init_weights="mini")),
    "llama-lokr": ("llama", lambda: LoKrConfig(r=4, alpha=6, target_modules=LLAMA_ALL, rank_pattern={"q_proj": 2})),
    "llama-lokr-decomposed": ("llama", lambda: LoKrConfig(r=1, target_modules=LLAMA_ALL, decompose_both=True,
                                                          decompose_factor=4)),
    "bert-lora-bias-all": ("bert", lambda: LoraConfig(r=4, target_modules=BERT_ALL, bias="all")),
    # bias="all" also saves the biases inside the modules_to_save wrapper, under '.modules_to_save.' and
    # '.original_module.' (as PEFT's task_type SEQ_CLS does with its classifier)
    "gpt2-lora-bias-all-modules_to_save": ("gpt2", lambda: LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all", modules_to_save=["ln_f", "h.1.mlp.c_fc"])),
    "bert-dora": ("bert", lambda: LoraConfig(r=4, target_modules=BERT_ALL, use_dora=True)),
    "bert-miss": ("bert", lambda: MissConfig(r=4, target_modules=BERT_ALL)),
    "bert-lokr": ("bert", lambda: LoKrConfig(r=4, target_modules=BERT_ALL)),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {kind: build(kind, root / kind) for kind in ("gpt2", "llama", "bert")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_equals_peft_merge_and_unload(case, bases, tmp_path):
    kind, make_config = CASES[case]
    adapter = make_adapter(bases[kind], make_config(), tmp_path / "adapter")
    fold_adapters(bases[kind], [adapter], tmp_path / "folded")
    ours = outputs(load_hf(tmp_path / "folded"))
    reference = outputs(peft_merged(bases[kind], adapter))
    unadapted = outputs(load_hf(bases[kind]))
    assert (reference - unadapted).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()


def test_several_adapters_fold_in_order(bases, tmp_path):
    """LoRA then DoRA then LoKr: PEFT merges each onto the model the previous merge produced."""
    base = bases["llama"]
    a1 = make_adapter(base, LoraConfig(r=4, target_modules=LLAMA_ALL), tmp_path / "a1", seed=1)
    a2 = make_adapter(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], use_dora=True), tmp_path / "a2",
                      seed=2)
    a3 = make_adapter(base, LoKrConfig(r=4, target_modules=["q_proj"]), tmp_path / "a3", seed=3)
    fold_adapters(base, [a1, a2, a3], tmp_path / "folded")
    ours = outputs(load_hf(tmp_path / "folded"))
    reference = outputs(peft_merged(base, a1, a2, a3))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()


def test_scale_is_a_fraction_of_the_update(bases, tmp_path):
    """--scale 0.5 folds half of B A: the same as PEFT merging an adapter whose lora_B was halved."""
    base = bases["gpt2"]
    config = LoraConfig(r=4, target_modules=GPT2_ALL, fan_in_fan_out=True)
    full = make_adapter(base, config, tmp_path / "full", seed=4)
    half = make_adapter(base, LoraConfig(r=4, target_modules=GPT2_ALL, fan_in_fan_out=True), tmp_path / "half",
                        seed=4, scale_b=0.5)
    fold_adapters(base, [full], tmp_path / "folded", FoldOptions(scale=0.5))
    ours = outputs(load_hf(tmp_path / "folded"))
    reference = outputs(peft_merged(base, half))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()


def test_names_dtypes_files_and_provenance_kept(tmp_path):
    """A bfloat16 base stays bfloat16 under its own names; config.json and generation_config.json are
    carried; untouched tensors are the base's bytes; provenance names the adapter."""
    base = build("llama", tmp_path / "base")
    model = load_hf(base).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    adapter = make_adapter(base, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "adapter")
    report = fold_adapters(tmp_path / "bf16", [adapter], tmp_path / "out")
    assert report.tensors_updated == 3
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f_in, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f_out:
        assert list(f_in.keys()) == list(f_out.keys())
        for k in f_in.keys():  # noqa: SIM118 (safe_open has no __iter__)
            a, b = f_in.get_tensor(k), f_out.get_tensor(k)
            assert b.dtype == torch.bfloat16
            assert torch.equal(a, b) != ("q_proj" in k), k
        record = json.loads(f_out.metadata()["modelsurgery"])
    assert record["operation"] == "fold"
    assert record["parameters"]["adapters"][0]["peft_type"] == "LORA"
    assert any(s["file"].endswith("adapter_model.safetensors") for s in record["sources"])


@pytest.mark.parametrize("init", [True, "bat"])
def test_bone_adapter_folds_as_miss(init, bases, tmp_path):
    """PEFT < 0.18 saved Bone adapters as peft_type BONE with '<module>.bone_block'; its bone/layer.py folds
    them as MiSS does today (balance: W[o, i] += D[i mod r, o]; bat: W_pq + W_pq D_p + D_p). A MiSS adapter
    renamed to Bone must fold to PEFT's MiSS merge."""
    from safetensors.torch import load_file, save_file

    base = bases["llama"]
    miss = make_adapter(base, MissConfig(r=4, target_modules=["q_proj", "o_proj"], init_weights=init), tmp_path / "m")
    bone = tmp_path / "bone"
    bone.mkdir()
    config = json.loads((miss / "adapter_config.json").read_text())
    config = {"peft_type": "BONE", "r": config["r"], "init_weights": config["init_weights"],
              "target_modules": config["target_modules"], "base_model_name_or_path": str(base)}
    (bone / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(miss / "adapter_model.safetensors")
    renamed = {k.replace("miss_block", "bone_block"): v for k, v in tensors.items()}
    save_file(renamed, bone / "adapter_model.safetensors")
    fold_adapters(base, [bone], tmp_path / "folded")
    ours, reference = outputs(load_hf(tmp_path / "folded")), outputs(peft_merged(base, miss))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()


@pytest.mark.parametrize("kind", ["gpt2", "llama3"])
def test_lora_on_a_tied_head_folds_into_the_embedding(kind, tmp_path):
    """A tied head has no tensor of its own (LLaMA 3.2, Qwen2.5, GPT-2 store the embedding only): PEFT's
    merge_and_unload adds a LoRA on lm_head to the shared weight, which save_pretrained writes as the
    embedding. The fold updates that tensor."""
    from tests.hf_tiny import save_tiny_decoder

    base = build("gpt2", tmp_path / "base") if kind == "gpt2" else save_tiny_decoder(kind, tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["lm_head", "c_attn" if kind == "gpt2" else "q_proj"],
                        fan_in_fan_out=kind == "gpt2")
    adapter = make_adapter(base, config, tmp_path / "adapter")
    fold_adapters(base, [adapter], tmp_path / "folded")
    ours, reference = outputs(load_hf(tmp_path / "folded")), outputs(peft_merged(base, adapter))
    assert (reference - outputs(load_hf(base))).abs().max() > 1e-2
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()


@pytest.mark.parametrize(("kind", "saved", "ensure"), [
    ("llama3", "embed_tokens", False), ("llama3", "lm_head", False), ("gpt2", "wte", False),
    ("gpt2", "lm_head", False), ("llama3", "embed_tokens", True), ("gpt2", "lm_head", True),
])
def test_modules_to_save_on_a_tied_pair_unties_as_peft_does(kind, saved, ensure, tmp_path):
    """modules_to_save on a tied embedding or head: PEFT trains a copy of that one module while the other keeps
    the shared weight, and merge_and_unload leaves them untied (tie_word_embeddings set to false); with
    ensure_weight_tying both read the trained copy and stay tied. The fold writes what PEFT's merge gives."""
    from tests.hf_tiny import save_tiny_decoder

    base = build("gpt2", tmp_path / "base") if kind == "gpt2" else save_tiny_decoder(kind, tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["c_attn" if kind == "gpt2" else "q_proj"], fan_in_fan_out=kind == "gpt2",
                        modules_to_save=[saved], ensure_weight_tying=ensure)
    adapter = make_adapter(base, config, tmp_path / "adapter")
    fold_adapters(base, [adapter], tmp_path / "folded")
    merged = peft_merged(base, adapter)
    ours, reference = outputs(load_hf(tmp_path / "folded")), outputs(merged)
    assert (reference - outputs(load_hf(base))).abs().max() > 1e-2
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()
    written = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert written["tie_word_embeddings"] is ensure
    if not ensure:  # (with ensure_weight_tying PEFT's merge holds two equal copies and says untied: the same model)
        assert merged.config.tie_word_embeddings is False
    with safe_open(str(tmp_path / "folded" / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not ensure  # noqa: SIM118


def test_lora_on_a_head_untied_by_an_earlier_adapter_folds_into_the_head(tmp_path):
    """The first adapter's modules_to_save unties the embedding from the head; PEFT then merges the second
    adapter's LoRA on lm_head into the head alone."""
    from tests.hf_tiny import save_tiny_decoder

    base = save_tiny_decoder("llama3", tmp_path / "base")
    first = make_adapter(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                         tmp_path / "first", seed=1)
    second = make_adapter(base, LoraConfig(r=4, target_modules=["lm_head"]), tmp_path / "second", seed=2)
    fold_adapters(base, [first, second], tmp_path / "folded")
    ours, reference = outputs(load_hf(tmp_path / "folded")), outputs(peft_merged(base, first, second))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()
