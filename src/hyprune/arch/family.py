"""The `Family` description and the registry of supported families."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
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
    "experts",  # routed experts of an MoE block
    "expert_ffn",  # FFN neurons of every routed expert (one size for all experts)
    "shared_expert_ffn",  # FFN neurons of the shared expert inside an MoE block (NemotronH)
    "mamba_expand",  # Mamba-1 inner width in units of hidden_size (Jamba: inner = mamba_expand * hidden_size)
)
MOE_AXES = ("experts", "expert_ffn", "shared_expert_ffn")

# Block kinds, in the words of the papers. A ``transformer`` block is a dense decoder layer: attention
# then MLP, each behind its own pre-norm (Llama, Qwen, Mistral); depth pruning drops it as one unit.
MAMBA, ATTENTION, MLP, MOE, TRANSFORMER = "mamba", "attention", "mlp", "moe", "transformer"
MAMBA1 = "mamba1"  # a Mamba-1 mixer (Jamba): per-channel SSM, no heads or groups


@dataclass(frozen=True)
class Part:
    """One pre-norm + mixer pair inside a block, by attribute path (dotted for nested modules)."""

    kind: str  # mamba, mamba1, attention, mlp or moe (a key of `hyprune.parts.PARTS`)
    norm: str
    mixer: str
    # role -> tensor or config field name where the family differs from the part kind's defaults
    # (`hyprune.parts`; Granite's MLP: {"down": "output_linear", "gate_up": "input_linear"})
    names: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


# one letter per block kind for a model's pattern (`hyprune inspect`); a family adds its compound kinds
LETTERS = {MAMBA: "M", ATTENTION: "*", MLP: "-", MOE: "E", TRANSFORMER: "T"}


@dataclass(frozen=True)
class Layout:
    """Per-family facts the parameter counts need beyond the axis sizes (`hyprune.search.counting`): bias
    flags (a config field name, or a constant), whether the mixer's norms hold weights (Mamba-2's gated norm,
    Mamba-1's dt/B/C norms), the MLP's and the routed experts' matrix counts, and whether the lm_head can be
    tied."""

    mamba_in_bias: str | bool = False
    mamba_out_bias: str | bool = False
    conv_bias: str | bool = True
    mamba_norm: str | bool = True
    qkv_bias: str | bool = False
    o_bias: str | bool = False
    qk_norm: bool = False
    mlp_bias: str | bool = False
    mlp_matrices: int = 3
    expert_matrices: int = 3  # gated experts (gate_up fused + down); NemotronH's relu2 experts: 2
    can_tie: bool = True

    def flag(self, config, value: str | bool) -> bool:
        return bool(getattr(config, value, False)) if isinstance(value, str) else value


def single_part(kind: str) -> list[Part]:
    """Hybrid families (NemotronH, Mamba2): every block is ``norm`` + ``mixer``."""
    return [Part(kind, "norm", "mixer")]


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model family lays out a hybrid model.

    Attributes:
        name: our name for the family (also the HF ``model_type``).
        base: attribute/state-dict prefix of the backbone (``model`` or ``backbone``).
        fields: canonical axis -> config field name, for the axes the family has.
        block_kinds: config -> one block kind per layer (``mamba``, ``attention``, ``mlp``, ``moe``,
            ``transformer``, or a family's compound kinds such as ``mamba+moe`` and ``hybrid``); a family
            raises `HypruneError` here for configs it cannot prune.
        set_block_kinds: (config dict, kept block indices, their kinds) -> None, rewrites the layer
            count/pattern in a config dict after blocks were dropped.
        parts: block kind -> its norm + mixer pairs (`Part`: ``mamba``, ``mamba1``, ``attention``, ``mlp`` or
            ``moe``), in forward order.
        embeddings / final_norm: attribute names under ``base``.
        hidden_multiple_of_heads: the config validator demands hidden_size % num_attention_heads == 0
            (Llama), even with an explicit head_dim.
        mamba_width_coupled_to_hidden: the Mamba inner width is ``expand * hidden_size`` in this
            family's config, so heads * head_dim must equal expand * hidden after pruning.
        fixed_axes: axis -> why the config cannot express a pruned size (Zamba2's hidden size); plans keep
            these axes whole and targets on them are refused with the reason.
        check_sizes: (config, result sizes by axis) -> None; raises `HypruneError` for sizes the family's
            config cannot express beyond the shared checks.
        tied_mlps: config -> groups of block indices whose MLP parts share one set of weights (Zamba2's
            shared transformer); a plan ranks their neurons once, from the summed scores of every use.
        unsliced: prefixes of parameter names inside a block that are copied whole (they touch only fixed
            axes, like Zamba2's shared attention).
        undroppable_kinds: config -> {block kind: why depth pruning cannot drop such a block}.
        renumber: (parameter name inside a kept block, config, kept block indices) -> its name in the pruned
            model, or None when the tensor belongs to something dropped (Zamba2's per-use adapter slots).
        keep_one: block kinds of which depth pruning by count keeps one block (the model's only attention:
            without it transformers cannot generate with a cache).
        depth_period: config -> P when the config writes the layer pattern as a period of P layers (Jamba);
            then only whole periods can go: every kept block must have a multiple of P dropped blocks
            before it (None: any blocks can go).
    """

    name: str
    base: str
    fields: dict[str, str]
    block_kinds: Callable[[Any], list[str]]
    set_block_kinds: Callable[[dict, list[int], list[str]], None]
    parts: Callable[[str], list[Part]] = single_part
    embeddings: str = "embeddings"
    final_norm: str = "norm_f"
    mamba_width_coupled_to_hidden: bool = False
    hidden_multiple_of_heads: bool = False  # the config refuses hidden_size % num_attention_heads != 0
    expand_field: str = "expand"  # config field of the Mamba expansion factor (coupled families)
    finish_config: Callable[[dict], None] | None = None  # derive dependent fields of a pruned config dict
    fixed_axes: dict[str, str] = field(default_factory=dict)
    check_sizes: Callable[[Any, dict[str, int]], None] | None = None
    tied_mlps: Callable[[Any], list[list[int]]] | None = None
    unsliced: tuple[str, ...] = ()
    undroppable_kinds: Callable[[Any], dict[str, str]] | None = None
    renumber: Callable[[str, Any, list[int]], str | None] | None = None
    depth_period: Callable[[Any], int] | None = None
    keep_one: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    # parameter-count facts (`Layout`); None: the search cannot count this family's shapes
    layout: Layout | None = None
    # (part kinds whose weights blocks share, (config, layout, sizes, kept kinds, count) -> {component: count}),
    # where count(part kind) counts one such part: shared weights counted once (Zamba2's shared transformer)
    shared_blocks: tuple[tuple[str, ...], Callable] | None = None
    # block kinds that run an attention outside their parts (Zamba2's hybrid layers: shared weights, own cache)
    shared_attention_kinds: tuple[str, ...] = ()
    # config field that gives the Mamba in_proj and out_proj a bias (ssm-flap writes its compensation there)
    mamba_proj_bias_field: str | None = None
    letters: dict[str, str] = field(default_factory=dict)  # block kind -> pattern letter, beyond `LETTERS`

    # ---- sizes -------------------------------------------------------------------------------
    def sizes(self, config) -> dict[str, int]:
        """Source sizes of every axis the model has, keyed by canonical axis name.

        The expert axes count only in a model with MoE blocks (a dense NemotronH's config still carries
        ``n_routed_experts``), so a dense model's sizes, and the plans made for it, ignore them.
        """
        moe = MOE in self.part_kinds(config)
        return {axis: int(getattr(config, name)) for axis, name in self.fields.items() if moe or axis not in MOE_AXES}

    def field_to_axes(self, field_name: str) -> list[str]:
        """The axes a config field sizes (Jamba's ``intermediate_size`` sizes the MLPs and the experts)."""
        axes = [axis for axis, name in self.fields.items() if name == field_name]
        if not axes:
            known = ", ".join(dict.fromkeys(self.fields.values()))
            raise HypruneError(
                f"'{field_name}' is not a prunable config field of {self.name}. Use one of: {known}."
            )
        return axes

    def expand(self, config) -> int:
        return int(getattr(config, self.expand_field, 2))

    # ---- names -------------------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"{self.base}.layers.{i}"

    def layers(self, model):
        return getattr(model, self.base).layers

    def block_parts(self, block, kind: str):
        """(part, norm module, mixer module) for each norm + mixer pair of a loaded block."""
        return [(part, attrgetter(part.norm)(block), attrgetter(part.mixer)(block)) for part in self.parts(kind)]

    def undroppable(self, config) -> dict[str, str]:
        """Block kind -> why depth pruning cannot drop it, for this config."""
        return self.undroppable_kinds(config) if self.undroppable_kinds else {}

    def letter(self, kind: str) -> str:
        """The pattern letter of a block kind (`LETTERS`, or the family's own for its compound kinds)."""
        letters = {**LETTERS, **self.letters}
        # a compound kind ("mamba+mlp": a decoder layer of a mixer and an MLP) takes its mixer's letter
        return letters[kind] if kind in letters else letters[kind.split("+")[0]]

    def mixers(self, model, part_kind: str) -> list[tuple[int, Part, Any]]:
        """(block index, part, mixer module) of every part of ``part_kind`` in a loaded model, in order."""
        return [(i, part, mixer) for i, (block, kind) in enumerate(zip(self.layers(model), self.block_kinds(model.config)))
                for part, _, mixer in self.block_parts(block, kind) if part.kind == part_kind]

    def part_kinds(self, config) -> list[str]:
        """Every part kind present in the model (``mamba``, ``attention``, ``mlp``)."""
        return sorted({part.kind for kind in self.block_kinds(config) for part in self.parts(kind)})


def expert_groups(config) -> int:
    """Groups of routed experts a router picks from first (NemotronH ``n_group``; 1 elsewhere).

    Experts are removed evenly from every group, since the router reshapes its scores to
    ``[n_group, experts // n_group]``.
    """
    return int(getattr(config, "n_group", None) or 1)


def attention_head_dim(config) -> int:
    """Per-head width of attention (explicit ``head_dim``, else hidden / heads)."""
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    return int(config.hidden_size) // int(config.num_attention_heads)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def registered() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_REGISTRY.values())


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
    family.block_kinds(config)  # a family refuses configs it cannot prune here, before any weights load
    return family
