"""GGUF output checked in the llama.cpp ecosystem's own Python readers: the ``gguf`` package's
reader and dequantizer (ggml's block layouts) and transformers' GGUF loader, which un-permutes
Q/K and maps llama.cpp's tensor names back to a LlamaForCausalLM."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from modelsurgery.deploy import check_scheme, deploy
from modelsurgery.deploy.gguf import read_weight
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.grids import QuantScheme
from tests.deploy.conftest import LLAMA, reference_model, rtn_source

SCHEMES = {"Q8_0": QuantScheme(8, "group", 32, True), "Q4_0": QuantScheme(4, "group", 32, True),
           "Q4_1": QuantScheme(4, "group", 32, False)}


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute: rotate-half rows to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module", params=list(SCHEMES))
def written(request, tmp_path_factory):
    src = rtn_source("gguf", SCHEMES[request.param])
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    report = deploy(src, out, "gguf", gguf_tokenizer="none")
    return request.param, src, out, report


def test_gguf_dequantizer_returns_our_weights_exactly(written):
    qtype, src, out, report = written
    assert report.max_scale_rounding_error == 0.0
    config = json.loads((LLAMA / "config.json").read_text())
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    for w in src.weights:
        layer, rest = w.name.split(".")[2], w.name.split(".", 3)[3]
        gname = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                 "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
                 "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up"}[rest]
        t = tensors[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type.name == qtype
        ours = w.dequantize().numpy()
        if gname == "attn_q":
            ours = converter_permute(ours, config["num_attention_heads"])
        elif gname == "attn_k":
            ours = converter_permute(ours, config["num_key_value_heads"])
        np.testing.assert_array_equal(dequantize(t.data, t.tensor_type), ours)
        if gname == "attn_v":  # our reader gives the representation back (rows in the file's order)
            back = read_weight(out, t.name)
            np.testing.assert_array_equal(back.codes, w.codes)
            np.testing.assert_array_equal(back.scale, w.scale)
            np.testing.assert_array_equal(back.zero_point, w.zero_point)


def test_gguf_metadata_llama_cpp_needs(written):
    qtype, _src, out, _ = written
    config = json.loads((LLAMA / "config.json").read_text())
    reader = gguf.GGUFReader(out)
    field = {k: f.contents() for k, f in reader.fields.items()}
    head_dim = config["head_dim"]
    expected = {
        "general.architecture": "llama",
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": config["vocab_size"],
        "general.file_type": int(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "tokenizer.ggml.model": "none",
    }
    for key, value in expected.items():
        assert field[key] == value, key
    assert field["llama.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert field["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    # every tensor llama.cpp's LLAMA graph loads, under its name from the gguf package's tables
    names = {t.name for t in reader.tensors}
    per_block = [gguf.MODEL_TENSOR.ATTN_NORM, gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K,
                 gguf.MODEL_TENSOR.ATTN_V, gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_NORM,
                 gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN]
    want = {gguf.TENSOR_NAMES[t] + ".weight" for t in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT_NORM,
                                                         gguf.MODEL_TENSOR.OUTPUT)}
    want |= {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in per_block
             for i in range(config["num_hidden_layers"])}
    assert names == want


def test_transformers_gguf_loader_matches_our_forward(written, token_ids):
    from transformers import AutoModelForCausalLM

    _, src, out, _ = written
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    with torch.no_grad():
        theirs = loaded(token_ids).logits
        ours = reference_model(src)(token_ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_provenance_as_other_outputs(written):
    """The file's provenance is the record every output carries: tool version and each source's sha256."""
    import hashlib

    from modelsurgery import __version__

    _, src, out, _ = written
    record = json.loads(gguf.GGUFReader(out).fields["modelsurgery"].contents())
    assert record["tool"] == "modelsurgery" and record["version"] == __version__
    assert [s["file"] for s in record["sources"]] == [str(p) for p in src.ckpt.source_files]
    for s in record["sources"]:
        with open(s["file"], "rb") as f:
            assert s["sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_scheme_refused_in_one_line():
    for scheme in (QuantScheme(4, "channel", None, True), QuantScheme(3, "group", 32, True),
                   QuantScheme(4, "group", 64, True), QuantScheme(8, "group", 32, False)):
        with pytest.raises(SurgeryError, match=r"--format gguf stores Q8_0 .* --group-size 32; got") as e:
            check_scheme("gguf", scheme)
        assert "\n" not in str(e.value)


def test_wordlevel_tokenizer_refused_and_nothing_written(tmp_path):
    src = rtn_source("gguf", SCHEMES["Q4_0"])
    out = tmp_path / "m.gguf"
    with pytest.raises(SurgeryError, match="WordLevel tokenizer.json .* --gguf-tokenizer none"):
        deploy(src, out, "gguf")
    assert list(tmp_path.iterdir()) == []


def test_other_architecture_refused(tmp_path):
    from modelsurgery.checkpoint import Checkpoint
    from modelsurgery.deploy.common import DeploySource

    gpt2 = LLAMA.parent / "gpt2"
    src = DeploySource(Checkpoint.open(gpt2), [], SCHEMES["Q4_0"], "rtn")
    with pytest.raises(SurgeryError, match="supports model_type llama, mistral, qwen2, qwen3, gemma2, gemma3_text, "
                                           "phi3, gpt_neox .* 'gpt2'"):
        deploy(src, tmp_path / "m.gguf", "gguf", gguf_tokenizer="none")
    assert list(tmp_path.iterdir()) == []


def test_mistral_as_llama_and_sliding_window_refused(tmp_path, token_ids):
    """The converter writes MistralForCausalLM as the llama architecture; a window shorter than the
    context would be lost (llama.cpp's llama graph attends to everything), so it is refused."""
    from transformers import AutoModelForCausalLM

    from tests.hf_tiny import save_tiny_mistral

    windowed = save_tiny_mistral(tmp_path / "windowed")
    with pytest.raises(SurgeryError, match="sliding_window 5 < context 64"):
        deploy(rtn_source("gguf", SCHEMES["Q8_0"], folder=windowed), tmp_path / "w.gguf", "gguf",
               gguf_tokenizer="none")
    # transformers' loader reads a llama file whose general.name is exactly "mistral" as an architecture
    # gguf-py does not list, and refuses it; the converter names the folder "mistral" "Mistral"
    folder = save_tiny_mistral(tmp_path / "mistral", sliding_window=None)
    src = rtn_source("gguf", SCHEMES["Q8_0"], skip=("down_proj",), folder=folder)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    deploy(src, out, "gguf", gguf_tokenizer="none")
    assert gguf.GGUFReader(out).fields["general.name"].contents() == "Mistral"
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = token_ids % 97
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference_model(src)(ids).logits, rtol=0, atol=1e-5)


CARD = "---\nlicense: mit\nmodel_name: Our Merge\n---\n# a merge\n"


@pytest.mark.parametrize("folder,card,name_or_path,name", [
    # hand-derived from gguf-py's Metadata (apply_metadata_heuristic, get_model_id_components, id_to_title)
    # and convert_hf_to_gguf.py's prepare_metadata
    ("my-llama-merge", None, None, "My Llama Merge"),        # the folder's name, '-' to spaces, words titled
    ("tiny-llama-v0.2", None, None, "Tiny Llama v0.2"),      # a version stays as written
    ("my merge", None, None, "My Merge"),                    # a name with spaces is one name, titled
    ("run3", None, "meta-llama/Llama-2-7b-hf", "Llama 2 7b Hf"),  # config.json's _name_or_path, a hub id
    ("run3", None, "/home/me/checkpoints/llama", "Run3"),    # ... but not a path of several folders
    ("run3", CARD, "meta-llama/Llama-2-7b-hf", "Our Merge"),  # the model card's model_name first
    ("run3", "---\n: [unclosed\n---\n", None, "Run3"),     # a card YAML cannot read: read without it
    ("run3", "---\nname: caf\xe9\n---\n".encode("latin-1"), None, "Run3"),  # ... or a card not in UTF-8
])
def test_general_name_as_the_converter_writes_it(tmp_path, folder, card, name_or_path, name):
    """general.name is the name llama.cpp's converter gives the model's folder, not the name of a
    folder the writer happens to read (the quantize path packs into one called 'packed')."""
    model = tmp_path / folder
    shutil.copytree(LLAMA, model)
    if card is not None:
        (model / "README.md").write_bytes(card if isinstance(card, bytes) else card.encode())
    if name_or_path is not None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
    out = tmp_path / "m.gguf"
    deploy(rtn_source("gguf", SCHEMES["Q8_0"], folder=model), out, "gguf", gguf_tokenizer="none")
    assert gguf.GGUFReader(out).fields["general.name"].contents() == name


def test_general_name_of_a_relative_folder(tmp_path, monkeypatch):
    """A model given as '.' is named after the folder it stands for, not ''."""
    from pathlib import Path

    model = shutil.copytree(LLAMA, tmp_path / "my-llama-merge")
    monkeypatch.chdir(model)
    deploy(rtn_source("gguf", SCHEMES["Q8_0"], folder=Path(".")), tmp_path / "m.gguf", "gguf", gguf_tokenizer="none")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents() == "My Llama Merge"


def test_llama_in_a_mistral_named_folder_loads_as_llama(tmp_path, token_ids):
    """transformers' loader takes a llama file for Mistral only when general.name is the one word
    "mistral" (a list membership test on the field); the converter's "My Mistral Merge" leaves a LLaMA a
    LLaMA, with its logits."""
    from transformers import AutoModelForCausalLM

    from tests.hf_tiny import save_tiny_llama3

    folder = save_tiny_llama3(tmp_path / "my-mistral-merge",
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    src = rtn_source("gguf", SCHEMES["Q8_0"], skip=("down_proj",), folder=folder)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    deploy(src, out, "gguf", gguf_tokenizer="none")
    assert gguf.GGUFReader(out).fields["general.name"].contents() == "My Mistral Merge"
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = token_ids % 97
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference_model(src)(ids).logits, rtol=0, atol=1e-5)


def test_llama_qk_biases_follow_the_rows(tmp_path, token_ids):
    """LLaMA with attention_bias: the converter permutes q_proj/k_proj biases as their weights'
    rows (LlamaModel.modify_tensors: 'q_proj.bias', 'k_proj.bias'), so each stored bias entry stays with
    its row; transformers' GGUF loader undoes both and must compute our model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.hf_tiny import save_tiny_llama3

    folder = save_tiny_llama3(tmp_path / "tiny", attention_bias=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    src = rtn_source("gguf", SCHEMES["Q8_0"], skip=("down_proj",), folder=folder)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    deploy(src, out, "gguf", gguf_tokenizer="none")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    config = src.config
    for proj, gname, heads in (("q_proj", "attn_q", config["num_attention_heads"]),
                               ("k_proj", "attn_k", config["num_key_value_heads"])):
        bias = src.ckpt.get(f"model.layers.1.self_attn.{proj}.bias").numpy()
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.1.{gname}.bias"].data), converter_permute(bias, heads))
    # (the loader's config map has no attention_bias for llama: the folder's config says it)
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                                  config=AutoConfig.from_pretrained(folder)).eval()
    ids = token_ids % 97
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference_model(src)(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_llama3_rope_frequencies(tmp_path, spelling):
    """LLaMA 3.1's rope scaling goes in as llama.cpp's rope_freqs.weight: the default frequencies divided
    by it must be transformers' own llama3 inverse frequencies, for config.json as transformers 5 writes
    it and as the 4.x files on the hub spell it (rope_scaling, top-level rope_theta)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tests.hf_tiny import save_tiny_llama3

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 2.0,
            "high_freq_factor": 8.0, "original_max_position_embeddings": 128}  # three regimes at head_dim 16
    folder = save_tiny_llama3(tmp_path / "tiny", hidden_size=64, rope_parameters=rope)
    if spelling == "rope_scaling":
        config = json.loads((folder / "config.json").read_text())
        scaling = config.pop("rope_parameters")
        config["rope_theta"] = scaling.pop("rope_theta")
        config["rope_scaling"] = scaling
        (folder / "config.json").write_text(json.dumps(config))
    src = rtn_source("gguf", SCHEMES["Q8_0"], skip=("down_proj",), folder=folder)
    out = tmp_path / "m.gguf"
    deploy(src, out, "gguf", gguf_tokenizer="none")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
    config = AutoConfig.from_pretrained(folder)
    head_dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    default = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    np.testing.assert_allclose(default / factors, theirs.double().numpy(), rtol=1e-6)
    assert (factors == 1).any() and (factors == 32).any() and ((factors > 1) & (factors < 32)).any()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_families_load_in_transformers_gguf_loader(tmp_path, token_ids, kind):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms): llama.cpp's qwen2/qwen3 architectures, rows in
    transformers' order (NeoX rope), tied head left to token_embd."""
    from transformers import AutoModelForCausalLM

    from tests.hf_tiny import save_tiny_decoder

    # transformers' GGUF config map for qwen3 does not read attention.key_length (head_dim falls back
    # to Qwen3Config's 128), so the tiny model uses head_dim 128; the key is written and checked below
    folder = save_tiny_decoder(kind, tmp_path / "tiny", **({"head_dim": 128} if kind == "qwen3" else {}))
    src = rtn_source("gguf", SCHEMES["Q4_1"], skip=("down_proj",), folder=folder)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    deploy(src, out, "gguf", gguf_tokenizer="none")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == kind
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.bias" in names if kind == "qwen2" else "blk.0.attn_q_norm.weight" in names
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd
    if kind == "qwen3":
        assert reader.fields["qwen3.attention.key_length"].contents() == 128
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    ids = token_ids % 97
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference_model(src)(ids).logits, rtol=0, atol=1e-5)


def _llama_bpe_folder(folder, prefix: bool = True):
    """A LLaMA-2-style tokenizer.json (BPE with byte fallback, ▁ for spaces) built with ``tokenizers``;
    ``prefix=False``: Gemma's kind, no '▁' put before the text (and a tokenizer class that keeps the file's
    pipeline: transformers' LlamaTokenizer would rebuild the prefix)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    chars = sorted(set("▁abcdefghijklmnopqrstuvwxyz.,!?'\n"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for c in chars:
        vocab[c] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template,
        "tokenizer_class": "LlamaTokenizerFast" if prefix else "PreTrainedTokenizerFast", "add_bos_token": True}))
    return len(vocab), template


def test_llama_tokenizer_and_chat_template_carried(tmp_path):
    """A SentencePiece-style tokenizer.json goes in as llama.cpp's 'llama' vocabulary (what the
    converter's _set_vocab_llama_hf writes); transformers' GGUF tokenizer loader reads it back."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path / "m"
    model = LlamaForCausalLM.from_pretrained(LLAMA)
    n_vocab, template = _llama_bpe_folder(tmp_path)
    model.resize_token_embeddings(n_vocab)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / f, folder / f)
    src = rtn_source("gguf", SCHEMES["Q4_0"], folder=folder)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    deploy(src, out, "gguf")
    reader = gguf.GGUFReader(out)
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["tokenizer.ggml.model"] == "llama"
    assert field["tokenizer.chat_template"] == template
    assert field["tokenizer.ggml.bos_token_id"] == 1 and field["tokenizer.ggml.eos_token_id"] == 2
    reference = AutoTokenizer.from_pretrained(folder)
    assert field["tokenizer.ggml.tokens"] == [reference.convert_ids_to_tokens(i) for i in range(n_vocab)]
    theirs = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "the cat, the hat!"
    assert theirs(text)["input_ids"] == reference(text)["input_ids"]


@pytest.mark.parametrize("prefix", [True, False])
def test_space_prefix_as_the_tokenizer_has_it(tmp_path, prefix):
    """llama.cpp's 'llama' vocabulary puts '▁' before the text unless tokenizer.ggml.add_space_prefix says
    otherwise: a tokenizer without that prefix (Gemma's) must tokenize in llama.cpp as in transformers."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path / "m"
    model = LlamaForCausalLM.from_pretrained(LLAMA)
    n_vocab, _ = _llama_bpe_folder(tmp_path, prefix)
    model.resize_token_embeddings(n_vocab)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / f, folder / f)
    out = tmp_path / "m.gguf"
    deploy(rtn_source("gguf", SCHEMES["Q8_0"], folder=folder), out, "gguf")
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.add_space_prefix"].contents() is prefix
    llama_cpp = pytest.importorskip("llama_cpp")
    reference = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        for text in ("the cat, the hat!", "hello world"):
            assert llm.tokenize(text.encode(), add_bos=True) == reference(text)["input_ids"], text
    finally:
        llm.close()
