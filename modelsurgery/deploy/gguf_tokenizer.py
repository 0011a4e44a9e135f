"""The tokenizer of a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it (``_set_vocab_llama_hf``,
``_set_vocab_none``): which tokenizer.json it converts, and the vocabulary, scores, token types, space prefix,
special tokens and chat template it writes, through the ``gguf`` package's own ``LlamaHfVocab`` and
``SpecialVocab``. The writer (``gguf.py``) calls it; ``check_tokenizer`` refuses before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from modelsurgery.errors import SurgeryError


def tokenizer_kind(folder: Path | None) -> str:
    """What llama.cpp's converter makes of the folder's tokenizer: 'llama' (a SentencePiece-style BPE
    tokenizer.json with byte fallback, ``_set_vocab_llama_hf``) or a reason it refuses."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        if folder is not None and (folder / "tokenizer.model").is_file():
            return "a SentencePiece tokenizer.model (needs the sentencepiece package; not written yet)"
        return "no tokenizer.json"
    model = json.loads((folder / "tokenizer.json").read_text()).get("model", {})
    kind = model.get("type", "?")
    if kind == "BPE" and model.get("byte_fallback") and not model.get("ignore_merges"):
        return "llama"
    if kind == "BPE":
        return ("a byte-level BPE tokenizer.json (the converter identifies its pre-tokenizer by a hash table "
                "this writer does not carry)")
    return f"a {kind} tokenizer.json (llama.cpp's converter refuses it too)"


def adds_space_prefix(folder: Path) -> bool:
    """Whether the tokenizer puts '▁' before the text (SentencePiece's dummy prefix): a ``Prepend('▁')``
    normalizer (LLaMA 2) or a Metaspace pre-tokenizer that prepends (Mistral v0.3); Gemma's does neither.
    llama.cpp reads it as ``tokenizer.ggml.add_space_prefix`` and prepends when the key is absent."""
    spec = json.loads((folder / "tokenizer.json").read_text())

    def parts(node, key: str) -> list[dict]:
        if not isinstance(node, dict):
            return []
        return [p for n in node[key] for p in parts(n, key)] if node.get("type") == "Sequence" else [node]

    for n in parts(spec.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for p in parts(spec.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace" and p.get("prepend_scheme", "always" if p.get("add_prefix_space", True)
                                                   else "never") != "never":
            return True
    return False


def check_tokenizer(folder: Path | None, tokenizer: str) -> None:
    """Refuse, in one line and before anything runs, a tokenizer the converter would not convert."""
    if tokenizer not in ("auto", "none"):
        raise SurgeryError(f"--gguf-tokenizer {tokenizer}: expected auto or none")
    kind = tokenizer_kind(folder) if tokenizer == "auto" else "llama"
    if kind != "llama":
        raise SurgeryError(f"{folder}: {kind}; GGUF needs a tokenizer llama.cpp can run: pass "
                           "--gguf-tokenizer none to write token ids only")


def write_tokenizer(w: gguf.GGUFWriter, folder: Path | None, vocab_size: int, tokenizer: str) -> str:
    """Vocabulary, special tokens and chat template, as the converter's ``_set_vocab_llama_hf`` writes
    them; ``tokenizer='none'`` writes token ids only, as its ``_set_vocab_none``."""
    check_tokenizer(folder, tokenizer)
    if tokenizer == "none":
        w.add_tokenizer_model("none")
    else:
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, toktypes = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            toktypes.append(toktype)
        if len(tokens) > vocab_size:
            raise SurgeryError(f"{folder}: the tokenizer has {len(tokens)} tokens, the model {vocab_size}")
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            toktypes.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_add_space_prefix(adds_space_prefix(folder))
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(toktypes)
    if folder is not None:
        gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    return tokenizer if tokenizer == "none" else "llama"
