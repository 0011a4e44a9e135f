"""The decoder LLM families (LLaMA 1-3, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3,
GPT-NeoX/Pythia): one ``DecoderFamily`` per ``Layout`` of ``layouts.py``, all running
``modules/decoder.Decoder`` with the ``DecoderSettings`` read here from config.json.

Detection: config.json's ``model_type`` (or, without it, ``architectures``) names the family, and the
tensor names must follow its layout. Without any config.json a layout that only one family has
(``claims_without_config``) is taken by tensor names alone; LLaMA's names then mean ``llama``. An
unknown ``model_type`` is never run as a look-alike: ``closest_family`` names the layout it follows
for the refusal message. Config values the decoder does not implement (an unknown rope type, an
attention variant) are refused in one line naming the key and value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import register
from modelsurgery.families.base import Attention, Linear, Norm
from modelsurgery.families.layouts import LAYOUTS, Layout, layouts_matching
from modelsurgery.families.rope import Rope, parse_rope
from modelsurgery.families.transformer import TransformerFamily

if TYPE_CHECKING:
    from torch import nn

FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class DecoderSettings:
    """Everything the decoder module (``modules/decoder.py``) needs besides tensor names, read from
    config.json and the tensor shapes by ``DecoderFamily.settings()``."""

    vocab: int
    hidden: int
    inner: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    activation: str
    parallel_residual: bool
    scaling: float
    attn_softcap: float | None
    final_softcap: float | None
    windows: tuple[int | None, ...]  # per layer: sliding window or None
    rope: Rope
    rope_local: Rope | None  # rope of sliding layers when it differs (Gemma 3)
    biases: frozenset[str]  # roles whose linear has a bias
    tied_head: bool


def closest_family(ckpt: Checkpoint) -> str | None:
    """The family whose tensor layout ``ckpt`` follows (most specific first), or None."""
    found = layouts_matching(ckpt)
    return found[0].family if found else None


class DecoderFamily(TransformerFamily):
    """A decoder-only LLM described by ``layout``; switches read from config.json."""

    layout: ClassVar[Layout]
    rotary = True

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        lay, config = cls.layout, ckpt.config or {}
        matching = layouts_matching(ckpt)
        if lay not in matching:
            return False
        if config.get("model_type"):
            return config["model_type"] in lay.model_types
        if config.get("architectures"):
            return any(a in lay.architectures for a in config["architectures"])
        return lay.claims_without_config and matching[0].family == lay.family

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        embed = f"{self.layout.embed}.weight"
        if embed not in ckpt:
            raise SurgeryError(f"{ckpt.path}: not a {self.name} checkpoint (no '{embed}')")

    # ----- structure ----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.ckpt.shape(f"{self.layout.embed}.weight")[1]

    @property
    def tied_head(self) -> bool:
        return f"{self.layout.lm_head}.weight" not in self.ckpt

    def config_for_layers(self, num_layers: int) -> dict | None:
        cfg = self.layer_count_config(num_layers, "num_hidden_layers")
        if cfg is not None and "layer_types" not in self.config and self.layout.window_rule == "typed" \
                and self.switches.get("sliding_window") is not None:
            # a pattern implied by index (Gemma's sliding_window_pattern) would shift: write it out, tiled
            types = self.per_layer_config()["layer_types"]
            cfg["layer_types"] = (types * (num_layers // len(types) + 1))[:num_layers]
        return cfg

    def per_layer_config(self) -> dict[str, list]:
        """The per-layer lists of config.json, plus ``layer_types`` written out when the family's window
        pattern implies it (Gemma's ``sliding_window_pattern``, Qwen's ``max_window_layers``)."""
        n = self.num_layers
        found = super().per_layer_config()
        if "layer_types" not in found and self.layout.window_rule == "typed" and n:
            found["layer_types"] = ["full_attention" if w is None else "sliding_attention"
                                    for w in self.layer_windows()]
        return found

    def _tensor(self, index: int, path: str, kind: str = "weight") -> str:
        return self.layout.tensor(index, path, kind)

    def block_linears(self, index: int) -> dict[str, Linear]:
        """Roles -> linears (torch layout, out x in): q, k, v, o, gate, up, down, or fused ``qkv``
        (``fused=("q", "k", "v")``; GPT-NeoX ``per_head``) and ``gate_up`` (``fused=("gate", "up")``)."""
        lay = self.layout
        return {role: Linear(self._tensor(index, path), self.maybe(self._tensor(index, path, "bias")),
                             fused=FUSED.get(role, ()), per_head=lay.qkv_per_head and role == "qkv")
                for role, path in lay.linears.items()}

    def block_norms(self, index: int) -> dict[str, Norm]:
        """``attn``/``mlp``: the norms before attention and MLP; ``attn_post``/``mlp_post``: Gemma's norms
        after them; ``q_norm``/``k_norm``: per-head RMSNorms (``per_head=True``, head_dim entries).
        ``offset`` 1.0 marks Gemma's (1 + w) scale."""
        lay = self.layout
        return {role: Norm(self._tensor(index, path), self.maybe(self._tensor(index, path, "bias")),
                           kind=lay.norm_kind, offset=lay.norm_offset, per_head=role in ("q_norm", "k_norm"))
                for role, path in lay.norms.items()}

    @property
    def attention(self) -> Attention | None:
        sw = self.switches
        heads = sw.get("num_attention_heads")
        if heads is None:
            return None
        heads = int(heads)
        head_dim = int(sw.get("head_dim") or self.hidden_size // heads)
        kv = sw.get("num_key_value_heads")
        if kv is None:  # LLaMA 1 configs: the key projection's rows tell it; fused NeoX: one per head
            k = self.layout.linears.get("k")
            kv = self.ckpt.shape(self._tensor(0, k))[0] // head_dim if k else heads
        return Attention(heads, int(kv), head_dim)

    def embedding_names(self) -> list[str]:
        return [f"{self.layout.embed}.weight"]

    def tied_weights(self) -> dict[str, str]:
        return {f"{self.layout.lm_head}.weight": f"{self.layout.embed}.weight"} if self.tied_head else {}

    def renamed_weights(self) -> dict[str, str]:
        return {f"{loaded}.{kind}": f"{stored}.{kind}" for loaded, stored in self.layout.module_aliases.items()
                for kind in ("weight", "bias")}

    def head_names(self) -> list[str]:
        lay = self.layout
        norm = [n for n in (f"{lay.final_norm}.weight", f"{lay.final_norm}.bias") if n in self.ckpt]
        return norm + ([] if self.tied_head else [f"{lay.lm_head}.weight"])

    # ----- switches from config.json ------------------------------------------------------------
    @property
    def switches(self) -> dict:
        """config.json over the family's config-class defaults (what transformers assumes for a key the
        file leaves out, e.g. Gemma 2's soft-caps); an explicit null stays null."""
        return {**self.layout.config_defaults, **self.config} if self.config else {}

    def layer_windows(self) -> list[int | None]:
        """Each block's sliding window (None: full attention)."""
        n, lay, cfg = self.num_layers, self.layout, self.switches
        window = cfg.get("sliding_window")
        if lay.window_rule == "none" or window is None or cfg.get("use_sliding_window") is False:
            return [None] * n
        window = int(window)
        if lay.window_rule == "all":
            return [window] * n
        types = cfg.get("layer_types")
        if types is not None:
            bad = next((t for t in types if t not in LAYER_TYPES), None)
            if bad is not None:
                raise SurgeryError(f"{self.ckpt.path}: config.json layer_types entry '{bad}' is not supported "
                                   f"(known: {', '.join(LAYER_TYPES)})")
            if len(types) != n:
                raise SurgeryError(f"{self.ckpt.path}: config.json layer_types has {len(types)} entries for "
                                   f"{n} blocks")
            return [window if t == "sliding_attention" else None for t in types]
        if lay.window_period:
            period = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or lay.window_period)
            return [window if (i + 1) % period else None for i in range(n)]
        first = int(cfg.get("max_window_layers", n))  # Qwen: layers from max_window_layers on
        return [window if i >= first else None for i in range(n)]

    def activation(self) -> str:
        """The MLP activation, as the family's transformers code reads config.json."""
        return self.layout.activation(self.config or {})

    def norm_eps(self) -> float:
        """The epsilon of every norm, as the family's transformers code reads config.json."""
        sw = self.switches
        return float(sw.get("rms_norm_eps") or sw.get("layer_norm_eps") or 1e-6)

    def config_readers(self) -> dict[str, Callable[[], Any]]:
        """Besides heads and the tied head: the activation, which layers slide and their window, the norm epsilon
        and the rope, each as the decoder runs it (so a 4.x ``rope_theta`` and a 5.x ``rope_parameters`` with the
        same base read the same, and a window that no layer uses reads as none)."""
        readers = super().config_readers()
        readers.update(dict.fromkeys(self.layout.activation_keys, self.activation))
        readers.update(rms_norm_eps=self.norm_eps, layer_norm_eps=self.norm_eps,
                       sliding_window=lambda: next((w for w in self.layer_windows() if w is not None), None),
                       layer_types=lambda: ["full_attention" if w is None else "sliding_attention"
                                            for w in self.layer_windows()])
        att = self.attention
        if att is not None:
            def rope(local: bool = False) -> Rope | None:
                return self.ropes(att.head_dim)[1 if local else 0]

            readers.update(rope_theta=lambda: rope().theta, rope_scaling=lambda: rope_scaling(rope()),
                           partial_rotary_factor=lambda: rope().dim / att.head_dim,
                           rope_local_base_freq=lambda: getattr(rope(local=True), "theta", None))
        return readers

    def ropes(self, head_dim: int) -> tuple[Rope, Rope | None]:
        """The rope of full-attention layers and, for Gemma 3, the one of sliding layers."""
        lay, where = self.layout, str(self.ckpt.path)
        if not lay.local_rope:
            return parse_rope(self.switches, head_dim, where, default_theta=lay.default_theta), None
        return (parse_rope(self.switches, head_dim, where, "full_attention", lay.default_theta),
                parse_rope(self.switches, head_dim, where, "sliding_attention", lay.default_local_theta))

    def settings(self) -> DecoderSettings:
        self.check_language_model()
        att = self.attention
        if att is None:
            self.need("num_attention_heads", why="the number of attention heads cannot be read from tensor shapes")
        if att.num_heads % att.num_kv_heads:
            raise SurgeryError(f"{self.ckpt.path}: num_attention_heads={att.num_heads} is not a multiple of "
                               f"num_key_value_heads={att.num_kv_heads}")
        if self.tied_head and self.cfg("tie_word_embeddings") is False:
            raise SurgeryError(f"{self.ckpt.path}: tensor '{self.layout.lm_head}.weight' is missing and "
                               "config.json says tie_word_embeddings=false")
        for key in ("use_bidirectional_attention", "is_encoder_decoder"):
            if self.config.get(key):
                raise SurgeryError(f"{self.ckpt.path}: config.json {key}={self.config[key]} is not supported "
                                   "(causal decoders only)")
        o_proj = self.block_linears(0)["o"].weight
        if self.ckpt.shape(o_proj)[1] != att.num_heads * att.head_dim:
            raise SurgeryError(f"{self.ckpt.path}: config.json num_attention_heads={att.num_heads} x head_dim="
                               f"{att.head_dim} does not match tensor '{o_proj}' of shape "
                               f"{tuple(self.ckpt.shape(o_proj))}")
        lay, sw = self.layout, self.switches
        rope, rope_local = self.ropes(att.head_dim)
        scalar = sw.get("query_pre_attn_scalar") if lay.attention_scalar else None
        lin = self.block_linears(0)
        return DecoderSettings(
            vocab=self.vocab_size, hidden=self.hidden_size,
            inner=self.ckpt.shape(lin["down"].weight)[1], num_layers=self.num_layers,
            heads=att.num_heads, kv_heads=att.num_kv_heads, head_dim=att.head_dim,
            eps=self.norm_eps(),
            activation=self.activation(),
            parallel_residual=lay.parallel_residual and bool(self.cfg("use_parallel_residual", default=True)),
            scaling=float(scalar) ** -0.5 if scalar else att.head_dim ** -0.5,
            attn_softcap=sw.get("attn_logit_softcapping") if lay.softcaps else None,
            final_softcap=sw.get("final_logit_softcapping") if lay.softcaps else None,
            windows=tuple(self.layer_windows()), rope=rope, rope_local=rope_local,
            biases=frozenset(role for role, x in lin.items() if x.bias is not None),
            tied_head=self.tied_head,
        )

    # ----- running ------------------------------------------------------------------------------
    def build_module(self, state=None, dtype=None) -> nn.Module:
        from modelsurgery.families.modules.decoder import Decoder

        return self.load_state(Decoder(self.settings(), self.layout), state, dtype)

    def features(self) -> list[str]:
        """What this checkpoint switches on, for ``surgery inspect`` (e.g. ``sliding_window=4096 on
        alternate layers``, ``qk_norm``, ``tied head``, ``rope llama3 x32``)."""
        try:
            s = self.settings()
        except SurgeryError as e:
            return ["tied head" if self.tied_head else "untied head", f"not runnable: {e}"]
        lay, out = self.layout, []
        if s.kv_heads != s.heads:
            out.append(f"grouped-query attention {s.heads}/{s.kv_heads}")
        if s.head_dim * s.heads != s.hidden:
            out.append(f"head_dim={s.head_dim}")
        out.append(s.rope.describe() + (f", rotary on {s.rope.dim}/{s.head_dim} dims" if s.rope.dim < s.head_dim
                                        else ""))
        if s.rope_local is not None:
            out.append("sliding layers: " + s.rope_local.describe())
        out += _window_feature(list(s.windows))
        if "q_norm" in lay.norms:
            out.append("qk_norm")
        biased = sorted(s.biases)
        if biased:
            out.append(f"biases on {'/'.join(biased)}")
        out += [f"fused {r}" + (" per head" if lay.qkv_per_head and r == "qkv" else "")
                for r in lay.linears if r in FUSED]
        if lay.norm_offset:
            out.append(f"norm scale ({lay.norm_offset:g} + w)")
        if "attn_post" in lay.norms:
            out.append("post-norms")
        if lay.embed_scale:
            out.append(f"embedding scale sqrt({s.hidden})")
        if s.scaling != s.head_dim ** -0.5:
            out.append(f"query_pre_attn_scalar={self.switches.get('query_pre_attn_scalar')}")
        if s.attn_softcap:
            out.append(f"attention softcap {s.attn_softcap:g}")
        if s.final_softcap:
            out.append(f"logit softcap {s.final_softcap:g}")
        if s.parallel_residual:
            out.append("parallel residual")
        gated = "gate" in lay.linears or "gate_up" in lay.linears
        out.append(f"{s.activation} {'gated ' if gated else ''}MLP")
        out.append("tied head" if s.tied_head else "untied head")
        return out

    def describe(self) -> dict:
        d = super().describe()
        d["tied_head"] = self.tied_head
        return d


def _window_feature(windows: list[int | None]) -> list[str]:
    sliding = [w for w in windows if w is not None]
    if not sliding:
        return []
    n, w = len(windows), sliding[0]
    if len(sliding) == n:
        return [f"sliding_window={w} on all layers"]
    if all((windows[i] is None) == (i % 2 == 1) for i in range(n)):
        return [f"sliding_window={w} on alternate layers"]
    return [f"sliding_window={w} on {len(sliding)} of {n} layers"]


def rope_scaling(rope: Rope) -> dict | None:
    """A rope's scaling as one comparable mapping (None: unscaled); its base is ``rope_theta``'s."""
    if rope.kind == "default":
        return None
    skip = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
    return {"rope_type": rope.kind, **{k: v for k, v in sorted(rope.params.items()) if k not in skip}}


def merge_config_keys(layout: Layout) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The config.json keys a merge compares (``Family.structural_config_keys``, ``tuning_config_keys``), from
    the switches the layout reads."""
    structural = ["num_attention_heads", "num_key_value_heads", "head_dim", layout.activation_keys[0],
                  "tie_word_embeddings", "partial_rotary_factor"]
    structural += ["layer_types"] if layout.window_rule == "typed" else []
    structural += ["query_pre_attn_scalar"] if layout.attention_scalar else []
    structural += ["attn_logit_softcapping", "final_logit_softcapping"] if layout.softcaps else []
    structural += ["use_parallel_residual"] if layout.parallel_residual else []
    tuning = ["rope_theta", "rope_scaling", "max_position_embeddings",
              "rms_norm_eps" if layout.norm_kind == "rmsnorm" else "layer_norm_eps"]
    tuning += ["sliding_window"] if layout.window_rule != "none" else []
    tuning += ["rope_local_base_freq"] if layout.local_rope else []
    return tuple(structural), tuple(tuning)


def _family_class(layout: Layout) -> type[DecoderFamily]:
    name = "".join(p.capitalize() for p in layout.family.split("_")) + "Family"
    structural, tuning = merge_config_keys(layout)
    return register(type(name, (DecoderFamily,), {
        "name": layout.family, "layout": layout, "model_types": layout.model_types,
        "config_defaults": layout.config_defaults, "structural_config_keys": structural,
        "tuning_config_keys": tuning,
        "block_pattern": rf"{layout.blocks.replace('.', chr(92) + '.')}\.(\d+)\.",
        "__doc__": f"{layout.family}: {', '.join(layout.architectures)} (see layouts.py)",
    }))


FAMILIES = {layout.family: _family_class(layout) for layout in LAYOUTS}
LlamaFamily = FAMILIES["llama"]
