"""GGUF files from ``surgery quantize --format gguf`` run in llama.cpp itself (llama-cpp-python, CPU):
next-token logits at every position against transformers' model holding the weights the file stores.

The reference: transformers' own model for the source folder, with each quantized tensor replaced by the
``gguf`` package's dequantization of the file's blocks, rows paired with the checkpoint's nearest rows
(so the reference does not restate the converter's row permutations). The float tensors (embeddings,
norms, the output head, rows 32 does not divide) are the checkpoint's own, as transformers loads them
(Gemma's norms without llama.cpp's plus one).

Tolerances. A file whose tensors are all float (written by our writer through the library: the CLI
refuses to quantize nothing) must match tightly: llama.cpp then computes in F32 throughout (K/V cache
asked for in F32), so only summation order differs. With Q8_0/Q4_0/Q4_1 weights, ggml's CPU matmul
first quantizes the activations to 8-bit blocks of 32 (Q8_0, or Q8_1 for Q4_1: ``vec_dot_type`` in
ggml-cpu), a relative error up to 1/254 of each block's largest input per product; through a few
layers that gives logit errors of the order of 1e-2 of the logits' spread. The bound below is 5% of
the reference logits' range, with at least 95% of argmax agreement: a layout bug (a wrong row order,
a missing norm shift, a wrong rope setting) moves logits by the order of their spread, and fails both. The table printed
below also compares with the reference computing as ggml does (its fp16-table GELU, its 8-bit
activations): then most files agree to 1e-7..3e-5, which shows these two are the differences.

Run: ``python -m pytest -m slow tests/deploy/test_gguf_llamacpp.py`` (llama-cpp-python built from source);
``python -m tests.deploy.test_gguf_llamacpp`` prints the table the README quotes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from modelsurgery.checkpoint import Checkpoint  # noqa: E402
from modelsurgery.deploy import deploy  # noqa: E402
from modelsurgery.deploy.common import DeploySource  # noqa: E402
from modelsurgery.ops.quantize.grids import QuantScheme  # noqa: E402
from tests.deploy.conftest import LLAMA  # noqa: E402
from tests.deploy.test_gguf_families import MODELS, off_grid  # noqa: E402
from tests.hf_tiny import save_tiny_decoder  # noqa: E402

pytestmark = pytest.mark.slow

#: block type -> `surgery quantize` scheme flags
QTYPES = {"Q8_0": ["--bits", "8"], "Q4_0": ["--bits", "4"], "Q4_1": ["--bits", "4", "--asymmetric"]}
FLOAT = "F32"  # every tensor float (library call)
#: tiny transformers models (tests/hf_tiny.py) beyond test_gguf_families' MODELS: LLaMA 3 rope scaling
#: (written as rope_freqs.weight), Mistral without a window (as the llama architecture), Qwen2 (q/k/v
#: biases), Qwen3 (q/k norms)
MORE = {"llama3": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {}}
TINY = {**MORE, **MODELS}
FAMILIES = ["llama", *TINY]  # the char LLaMA fixture, then the tiny transformers models
N_TOKENS = 48
F32_BOUND = 3e-4  # of the reference logits' range, against the reference with ggml's GELU
REL_BOUND, AGREEMENT = 0.05, 0.9


def model_folder(family: str, work: Path) -> Path:
    if family == "llama":
        return LLAMA
    folder = work / family
    if not folder.exists():
        save_tiny_decoder(family, folder, **TINY[family])
    return folder


def skips(family: str, folder: Path) -> list[str]:
    """What stays float besides the defaults: rows 32 does not divide (GGUF blocks hold 32)."""
    if family == "llama":
        return ["down_proj"]
    return list(off_grid(folder))


def write_gguf(family: str, qtype: str, work: Path) -> Path:
    """``surgery quantize --method rtn --format gguf`` (or, for F32, our writer with nothing quantized)."""
    from typer.testing import CliRunner

    from modelsurgery.cli.app import app

    folder = model_folder(family, work)
    out = work / f"{family}-{qtype}.gguf"
    if out.exists():
        return out
    if qtype == FLOAT:
        src = DeploySource(Checkpoint.open(folder), [], QuantScheme(8, "group", 32, True), "rtn")
        deploy(src, out, "gguf", gguf_tokenizer="none")
        return out
    args = ["quantize", str(folder), "-o", str(out), "--format", "gguf", "--gguf-tokenizer", "none",
            "--method", "rtn", *QTYPES[qtype], "--granularity", "group", "--group-size", "32", "-q"]
    for name in skips(family, folder):
        args += ["--skip", name]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return out


def stored_weights(path: Path, folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The file's quantized tensors dequantized by the ``gguf`` package, under transformers' names (the
    ``gguf`` package's tensor map) and in the checkpoint's row order: each checkpoint row is paired with
    the nearest stored row, so the reference knows nothing of the converter's row permutations (a file
    whose rows are in the wrong order runs differently in llama.cpp, and fails). With each, Q4_1's
    block minimums m [rows, blocks] (bytes 2-3 of its 20-byte blocks, ggml-common.h), else None."""
    import gguf
    from gguf.quants import dequantize

    ckpt = Checkpoint.open(folder)
    reader = gguf.GGUFReader(path)
    arch_name = reader.fields["general.architecture"].contents()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    tmap = gguf.get_tensor_name_map(arch, ckpt.config["num_hidden_layers"])
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name in ckpt.keys():  # noqa: SIM118
        t = tensors.get(tmap.get_name(name, try_suffixes=(".weight", ".bias")))
        if t is None or t.tensor_type.name not in QTYPES:
            continue
        stored = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        original = ckpt.get(name).float()
        nearest = torch.cdist(original, stored).argmin(1)
        assert sorted(nearest.tolist()) == list(range(len(stored))), f"{name}: rows do not pair one to one"
        m = None
        if t.tensor_type.name == "Q4_1":
            raw = np.ascontiguousarray(t.data).reshape(len(stored), -1, 20)[..., 2:4].copy()
            m = torch.from_numpy(raw.view(np.float16)[..., 0].astype(np.float32))[nearest]
        out[name] = (stored[nearest], m)
    return out


class GGMLGelu(torch.nn.Module):
    """GELU as ggml's CPU backend computes it (ggml-cpu/vec.h, GGML_GELU_FP16 defined): the tanh
    approximation read from a table indexed by the input rounded to fp16, holding fp16 values; 0 below
    -10, the identity above 10. transformers computes it in float32 (GPT-NeoX's 'gelu': the erf form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def ggml_q8_linear(module: torch.nn.Linear, m: torch.Tensor | None) -> None:
    """A Linear computing as ggml's CPU matmul does with Q8_0/Q4_0/Q4_1 weights: the input rounded to
    8-bit blocks of 32 along the row, d = max |x| / 127 kept in fp16 (quantize_row_q8_0 / q8_1 in
    ggml-quants.c); for Q4_1 (``m``: its block minimums) the m term uses Q8_1's block sum s = d * sum(q),
    also kept in fp16 (vec_dot_q4_1_q8_1: d_w d_x sum(q_w q_x) + m_w s_x)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
        d16 = d.half().float()
        y = torch.nn.functional.linear((q * d16).reshape(x.shape), module.weight, module.bias)
        if m is not None:
            qsum = q.sum(-1)
            y = y + ((d[..., 0] * qsum).half().float() - d16[..., 0] * qsum) @ m.T
        return y
    module.forward = forward


def reference_logits(path: Path, folder: Path, ids: list[int], ggml_gelu: bool = False,
                     ggml_q8: bool = False) -> np.ndarray:
    """transformers' model holding the file's weights; ``ggml_gelu``: with its GELU replaced by ggml's;
    ``ggml_q8``: the inputs of the quantized Linears rounded as ggml rounds them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    state = model.state_dict()
    stored = stored_weights(path, folder)
    for name, (w, _) in stored.items():
        state[name] = w
    model.load_state_dict(state)
    if ggml_gelu:
        for module in list(model.modules()):
            for attr in ("act_fn", "act"):
                if isinstance(getattr(module, attr, None), torch.nn.Module) and "GELU" in \
                        type(getattr(module, attr)).__name__.upper():
                    setattr(module, attr, GGMLGelu())
    if ggml_q8:
        for name, module in model.named_modules():
            if f"{name}.weight" in stored:
                ggml_q8_linear(module, stored[f"{name}.weight"][1])
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def llama_cpp_logits(path: Path, ids: list[int], n_ctx: int | None = None) -> np.ndarray:
    """``n_ctx``: the context asked for and checked (None: 64, which llama.cpp pads to 256)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = int(llama_cpp.GGML_TYPE_F32)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx or 64, n_batch=n_ctx or 64,
                          n_threads=1, type_k=f32, type_v=f32, verbose=False)
    try:
        assert n_ctx is None or llm.n_ctx() == n_ctx, f"llama.cpp's context is {llm.n_ctx()}, not {n_ctx}"
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()


def measure(family: str, qtype: str, work: Path) -> dict:
    folder = model_folder(family, work)
    vocab = Checkpoint.open(folder).config["vocab_size"]
    ids = np.random.default_rng(0).integers(1, vocab, size=N_TOKENS).tolist()
    path = write_gguf(family, qtype, work)
    theirs = llama_cpp_logits(path, ids)
    ours = reference_logits(path, folder, ids)
    diff = np.abs(theirs - ours).max()
    spread = float(ours.max() - ours.min())
    ggml = np.abs(theirs - reference_logits(path, folder, ids, ggml_gelu=True)).max()
    q8 = np.abs(theirs - reference_logits(path, folder, ids, ggml_gelu=True, ggml_q8=True)).max()
    return {"family": family, "type": qtype, "max_abs_diff": float(diff), "logit_range": spread,
            "max_abs_diff_ggml_gelu": float(ggml), "relative_ggml_gelu": float(ggml / spread),
            "max_abs_diff_ggml_q8": float(q8), "relative_ggml_q8": float(q8 / spread),
            "relative": float(diff / spread), "argmax_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
            "tokens": len(ids)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    return tmp_path_factory.mktemp("llamacpp")


@pytest.mark.parametrize("family", FAMILIES)
def test_float_gguf_matches_transformers_tightly(work, family):
    m = measure(family, FLOAT, work)
    assert m["relative_ggml_gelu"] < F32_BOUND, m
    assert m["argmax_agreement"] == 1.0, m


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_gguf_matches_our_dequantized_forward(work, family, qtype):
    m = measure(family, qtype, work)
    assert m["relative"] < REL_BOUND, m
    assert m["argmax_agreement"] >= AGREEMENT, m


def test_llama_attention_bias_runs_as_transformers(tmp_path):
    """LLaMA with attention_bias (q/k/v/o biases): llama.cpp's llama graph adds bq/bk to the rows the
    converter permuted, so the q/k biases must be stored in that row order. The biases are made large
    (x30) so that a wrong order shows far above the float bound."""
    from safetensors.torch import load_file, save_file

    folder = save_tiny_decoder("llama3", tmp_path / "m", attention_bias=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    state = load_file(folder / "model.safetensors")
    for name in state:
        if name.endswith(("q_proj.bias", "k_proj.bias")):
            state[name] = state[name] * 30
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "m.gguf"
    deploy(DeploySource(Checkpoint.open(folder), [], QuantScheme(8, "group", 32, True), "rtn"), out, "gguf",
           gguf_tokenizer="none")
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 97, N_TOKENS)]
    theirs, ours = llama_cpp_logits(out, ids), reference_logits(out, folder, ids)
    assert np.abs(theirs - ours).max() < F32_BOUND * np.ptp(ours)
    assert (theirs.argmax(1) == ours.argmax(1)).all()


def float_gguf(folder: Path, out: Path) -> Path:
    deploy(DeploySource(Checkpoint.open(folder), [], QuantScheme(8, "group", 32, True), "rtn"), out, "gguf",
           gguf_tokenizer="none")
    return out


def test_gemma3_linear_global_rope_runs_as_transformers(tmp_path):
    """Gemma 3 4B-27B's rope: linear x8 on the full layers (here layer 5 of 7), none on the sliding ones.
    llama.cpp computes transformers' logits; the same weights with unscaled global rope (transformers'
    model for that config) fail the bound, so the check sees the scaling."""
    shape = {"head_dim": 16, "query_pre_attn_scalar": 16, "num_hidden_layers": 7, "sliding_window_pattern": 6}
    folder = save_tiny_decoder("gemma3", tmp_path / "m", **shape)
    unscaled = save_tiny_decoder("gemma3", tmp_path / "unscaled", **shape, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    assert (folder / "model.safetensors").read_bytes() == (unscaled / "model.safetensors").read_bytes()
    out = float_gguf(folder, tmp_path / "m.gguf")
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 97, N_TOKENS)]
    theirs = llama_cpp_logits(out, ids)
    ours = reference_logits(out, folder, ids, ggml_gelu=True)
    assert np.abs(theirs - ours).max() < F32_BOUND * np.ptp(ours)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    unscaled_logits = reference_logits(out, unscaled, ids, ggml_gelu=True)
    assert np.abs(theirs - unscaled_logits).max() > 3 * F32_BOUND * np.ptp(ours)  # measured: 9e-2 of the range


#: pretrained context 256 of 1024: llama.cpp pads n_ctx to a multiple of 256, so the short factors are
#: reachable only with an original context of at least 256
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
                 "short_factor": [1.0, 1.3, 1.9, 2.5], "long_factor": [1.5, 3.0, 6.0, 12.0]}


@pytest.mark.parametrize("n_ctx,n_tokens,used", [(256, N_TOKENS, "short"), (512, 300, "long")])
def test_phi3_longrope_runs_as_transformers(tmp_path, n_ctx, n_tokens, used):
    """Phi-3 128k / 3.5 longrope. llama.cpp takes the long factors when its context n_ctx (per sequence)
    exceeds the original one, transformers when the sequence does: they agree for n_ctx <= original
    (short) and for sequences longer than the original (long), the two cases run here. Against
    transformers' model with the other factors in both places, llama.cpp fails the bound: the check sees
    which set it used. (With n_ctx > original and a sequence within the original context, llama.cpp takes
    the long factors and transformers the short ones: a different model, not run here.)"""
    other = {"short": "long_factor", "long": "short_factor"}[used]
    config = {"max_position_embeddings": 1024, "original_max_position_embeddings": 256}
    folder = save_tiny_decoder("phi3", tmp_path / "m", **config, rope_parameters=PHI3_LONGROPE)
    swapped = save_tiny_decoder("phi3", tmp_path / "other", **config, rope_parameters={
        **PHI3_LONGROPE, "short_factor": PHI3_LONGROPE[other], "long_factor": PHI3_LONGROPE[other]})
    out = float_gguf(folder, tmp_path / "m.gguf")
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 97, n_tokens)]
    theirs = llama_cpp_logits(out, ids, n_ctx=n_ctx)
    ours = reference_logits(out, folder, ids)
    assert np.abs(theirs - ours).max() < F32_BOUND * np.ptp(ours)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    # measured: 2e-7 of the range above, 1.6e-3 here
    assert np.abs(theirs - reference_logits(out, swapped, ids)).max() > 3 * F32_BOUND * np.ptp(ours)


def main() -> None:
    """One row per family; each cell: max |logit difference| with transformers (of the logits' range),
    argmax agreement, then the max difference once the reference computes as ggml does (GELU, 8-bit
    activations)."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="gguf-llamacpp-"))
    types = (FLOAT, *QTYPES)
    try:
        print(f"{N_TOKENS} tokens; cell: max |diff| (logit range), argmax agreement; [max |diff| against the "
              "reference computing as ggml]")
        print("| family | " + " | ".join(types) + " |")
        print("|---" * (len(types) + 1) + "|")
        for family in FAMILIES:
            cells = []
            for qtype in types:
                m = measure(family, qtype, work)
                cells.append(f"{m['max_abs_diff']:.1e} ({m['logit_range']:.2g}), {m['argmax_agreement']:.0%}; "
                             f"[{m['max_abs_diff_ggml_q8']:.0e}]")
            print(f"| {family} | " + " | ".join(cells) + " |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
