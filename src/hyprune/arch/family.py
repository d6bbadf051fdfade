"""The `Family` description and the registry of supported families."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from hyprune.errors import HypruneError

# Canonical axis names used in plans and scores. A family maps each onto its own config field.
AXES = (
    "hidden",  # embedding channels (residual stream width)
    "ffn",  # MLP neurons
    "attention_heads",  # query heads
    "kv_heads",  # key/value heads (whole KV groups with their query heads)
    "mamba_heads",
    "mamba_head_dim",
    "ssm_state",
    "mamba_groups",  # B/C groups (n_groups)
)

# Block kinds, in the words of the papers.
MAMBA, ATTENTION, MLP, MOE = "mamba", "attention", "mlp", "moe"


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model family lays out a hybrid model.

    Attributes:
        name: our name for the family (also the HF ``model_type``).
        base: attribute/state-dict prefix of the backbone (``model`` or ``backbone``).
        fields: canonical axis -> config field name, for the axes the family has.
        block_kinds: config -> one block kind per layer (``mamba``, ``attention``, ``mlp``, ``moe``).
        set_block_kinds: (config dict, kinds) -> None, rewrites the layer pattern in a config dict.
        mamba_width_coupled_to_hidden: the Mamba inner width is ``expand * hidden_size`` in this
            family's config, so heads * head_dim must equal expand * hidden after pruning.
    """

    name: str
    base: str
    fields: dict[str, str]
    block_kinds: Callable[[Any], list[str]]
    set_block_kinds: Callable[[dict, list[str]], None]
    mamba_width_coupled_to_hidden: bool = False
    notes: tuple[str, ...] = field(default=())

    # ---- sizes -------------------------------------------------------------------------------
    def sizes(self, config) -> dict[str, int]:
        """Source sizes of every axis, keyed by canonical axis name."""
        out = {axis: int(getattr(config, name)) for axis, name in self.fields.items()}
        return out

    def field_to_axis(self, field_name: str) -> str:
        for axis, name in self.fields.items():
            if name == field_name:
                return axis
        known = ", ".join(self.fields.values())
        raise HypruneError(
            f"'{field_name}' is not a prunable config field of {self.name}. Use one of: {known}."
        )

    def expand(self, config) -> int:
        return int(getattr(config, "expand", 2))

    # ---- names -------------------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"{self.base}.layers.{i}"

    def layers(self, model):
        return getattr(model, self.base).layers

    def check_supported(self, config) -> None:
        kinds = self.block_kinds(config)
        if MOE in kinds:
            raise HypruneError(
                f"{self.name} checkpoints with MoE blocks ('E' in the pattern) are not supported yet: "
                "hyprune prunes Mamba, attention and dense MLP blocks. Use a dense-MLP checkpoint."
            )


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def family_for_config(config) -> Family:
    """The family of a loaded HF config, or a `HypruneError` that lists the supported ones."""
    model_type = getattr(config, "model_type", None)
    family = _REGISTRY.get(model_type)
    if family is None:
        supported = ", ".join(sorted(_REGISTRY))
        raise HypruneError(
            f"Unsupported architecture '{model_type}'. hyprune supports: {supported}. "
            "Check the model's config.json (model_type)."
        )
    family.check_supported(config)
    return family
