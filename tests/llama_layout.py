"""A LLaMA checkpoint's config.json and tensor shapes at any size, without transformers: for tests that write a
large model tensor by tensor (memory bounds) in a child process that must not import more than it measures."""

from __future__ import annotations


def llama_layout(hidden: int, inner: int, layers: int, vocab: int, **config) -> tuple[dict, dict[str, tuple]]:
    """(config.json of an untied LLaMA with 8 heads, {tensor name: shape}); ``config`` adds or overrides keys."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inner, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
           "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           **config}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       **{p + f"self_attn.{r}_proj.weight": (hidden, hidden) for r in "qkvo"},
                       p + "mlp.gate_proj.weight": (inner, hidden), p + "mlp.up_proj.weight": (inner, hidden),
                       p + "mlp.down_proj.weight": (hidden, inner)})
    return cfg, shapes
