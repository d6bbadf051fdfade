"""Dense Transformers (Llama, Qwen2, Qwen3, Mistral): the original Minitron recipe.

Every decoder layer is one ``transformer`` block: ``input_layernorm`` + ``self_attn``, then
``post_attention_layernorm`` + ``mlp`` (gated: gate/up/down). Qwen2 adds q/k/v biases, Qwen3 q/k
norms over ``head_dim`` (untouched by head pruning). Depth pruning drops whole decoder layers; a
per-layer ``layer_types`` list (sliding/full attention) is cut to the kept layers.
"""

from __future__ import annotations

from hyprune.arch.family import ATTENTION, MLP, TRANSFORMER, Family, Part, Layout, register


def _block_kinds(config) -> list[str]:
    return [TRANSFORMER] * int(config.num_hidden_layers)


def _set_block_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["num_hidden_layers"] = len(kept)
    if isinstance(config_dict.get("layer_types"), list):
        config_dict["layer_types"] = [config_dict["layer_types"][i] for i in kept]
    if "max_window_layers" in config_dict:  # Qwen2: layers below this index use full attention
        config_dict["max_window_layers"] = sum(1 for i in kept if i < config_dict["max_window_layers"])


def _parts(kind: str) -> list[Part]:
    return [Part(ATTENTION, "input_layernorm", "self_attn"), Part(MLP, "post_attention_layernorm", "mlp")]


_FIELDS = {
    "hidden": "hidden_size",
    "ffn": "intermediate_size",
    "attention_heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
}

_LAYOUTS = {
    "llama": Layout(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": Layout(),
    "qwen2": Layout(qkv_bias=True),
    "qwen3": Layout(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True),
}

for _name in ("llama", "qwen2", "qwen3", "mistral"):
    register(Family(name=_name, base="model", fields=_FIELDS, block_kinds=_block_kinds,
                    set_block_kinds=_set_block_kinds, parts=_parts, embeddings="embed_tokens", final_norm="norm",
                    hidden_multiple_of_heads=_name == "llama", layout=_LAYOUTS[_name],
                    notes=("LlamaConfig demands hidden_size % num_attention_heads == 0.",) if _name == "llama" else ()))
