"""DMC / DMS on a loaded Hugging Face model: decisions from its own q/k projections, an attention function
registered through transformers' attention interface, and a cache whose attention layers hold per-head
variable-length keys and values.

Where the decisions come from: dimension 0 of each KV head's key projection, before rotary embeddings,
standardized per head (``alpha = sigmoid((k_0 - center) / scale - offset)``, center and scale the mean and
spread of that head's k_0 on calibration text, `calibrate`; DMC's importance ``omega = sigmoid(q_0)`` of the
group's first query head). Standardizing puts every head the same distance from its first decisions: with
one raw offset, heads whose k_0 sits low never move in a short retrofit while others compress fully. The dimension still takes part in attention, so a checkpoint keeps its tensor shapes and stock
``from_pretrained`` loads it; the method's settings are saved in ``config.hyprune_kv``. With every decision
0 (``offset`` large) the model computes what it computed before.

    model = AutoModelForCausalLM.from_pretrained(folder)   # a kv-compress output
    hyprune.kv.enable(model)                               # reads config.hyprune_kv
    model.generate(...)                                    # now with the compressed cache
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import wraps

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hyprune.arch.family import ATTENTION, family_for_config
from hyprune.errors import HypruneError
from hyprune.kv.methods import DMCState, DMSState, attend, dmc_accumulate, dmc_bias, dms_bias, expand_heads, first_opens

NAME = "hyprune_kv"  # the attention implementation's name in transformers' registries
METHODS = ("dmc", "dms")


@dataclass
class KVSpec:
    """What ``config.hyprune_kv`` holds: the method, DMS's window, the decision offset (in units of each
    head's spread of k_0 when ``centers`` / ``scales`` are set: 3 drops ~0.1% of tokens at the start), the
    temperature of the Gumbel-sigmoid in training, the cache page size, the attention the model used
    before, and per attention layer and KV head the standardization of k_0 (`calibrate`; none: raw k_0)."""

    method: str = "dms"
    window: int = 16
    offset: float = 3.0
    temperature: float = 0.5
    page: int = 16
    inner: str = "eager"
    centers: list[list[float]] | None = None
    scales: list[list[float]] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise HypruneError(f"KV compression method must be one of {', '.join(METHODS)}; got '{self.method}'.")
        if self.window < 0:
            raise HypruneError(f"the DMS window must be >= 0, got {self.window}")


@dataclass
class _Attached:
    """Per attention module: its spec, the last decision inputs its projections produced, its cache layer."""

    spec: KVSpec
    kv_heads: int
    groups: int
    center: torch.Tensor | None = None  # [kv_heads, 1] standardization of k_0 (None: raw)
    scale: torch.Tensor | None = None
    k0: torch.Tensor | None = None
    q0: torch.Tensor | None = None
    layer: Compressing | None = None
    stats: dict = field(default_factory=dict)


# ---- decisions ---------------------------------------------------------------------------------------
def decisions(logits: torch.Tensor, spec: KVSpec, training: bool, center=None, scale=None) -> torch.Tensor:
    """alpha from the decision inputs k_0 ([B, H, T]), standardized by ``center`` / ``scale`` ([H, 1]) when
    given: a Gumbel-sigmoid sample in training, 0 / 1 otherwise."""
    x = logits.float()
    if center is not None:
        x = (x - center.to(x.device)) / scale.to(x.device)
    x = x - spec.offset
    if not training:
        return (x > 0).float()
    u = torch.rand_like(x).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((x + torch.log(u) - torch.log1p(-u)) / spec.temperature)


# ---- the cache ---------------------------------------------------------------------------------------
class Compressing:
    """What an attention layer's cache does under compression: count the tokens it has seen and hand the
    new ones to the attention function, which keeps them in ``state`` (`DMSState` / `DMCState`). Mixed
    into the layer class transformers built (`compressed_layer`), so a hybrid layer that also holds Mamba
    states (Falcon-H1) keeps them."""

    is_croppable = False
    state: DMSState | DMCState | None = None
    seen = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        return key_states, value_states  # the new tokens only: the attention function merges them in

    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        self.state, self.seen = None, 0
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise HypruneError("the compressed KV cache does not support beam search or num_return_sequences > 1")

    batch_select_indices = batch_repeat_interleave

    def bytes_used(self) -> int:
        return self.state.bytes_used() if self.state is not None else 0

    def bytes_allocated(self) -> int:
        return self.state.bytes_allocated() if self.state is not None else 0


class CompressedLayer(Compressing, DynamicLayer):
    """A plain attention layer's compressed cache."""


_TYPES: dict[type, type] = {DynamicLayer: CompressedLayer}


def compressed_layer(layer):
    """``layer`` (as `DynamicCache` built it) turned into its compressed form, other states kept."""
    cls = type(layer)
    if cls not in _TYPES:
        _TYPES[cls] = type(f"Compressed{cls.__name__}", (Compressing, cls), {})
    compressed = _TYPES[cls].__new__(_TYPES[cls])
    compressed.__dict__.update(vars(layer))
    compressed.state, compressed.seen = None, 0
    return compressed


class CompressedCache(DynamicCache):
    """transformers' dynamic cache with every attention layer replaced by a `CompressedLayer` (other
    layers, a hybrid's Mamba states, stay as transformers makes them)."""

    def __init__(self, model) -> None:
        super().__init__(config=model.config)
        for i in attention_layers(model):
            self.layers[i] = compressed_layer(self.layers[i])

    def compressed(self) -> list[Compressing]:
        return [layer for layer in self.layers if isinstance(layer, Compressing)]

    def bytes_used(self) -> int:
        """Bytes the attention layers' keys and values hold (pages in use, the DMS rings)."""
        return sum(layer.bytes_used() for layer in self.compressed())

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.compressed())


def attention_layers(model) -> list[int]:
    family = family_for_config(model.config)
    return [i for i, _, _ in family.mixers(model, ATTENTION)]


def attention_mixers(model) -> list:
    """The model's attention modules, in layer order."""
    family = family_for_config(model.config)
    return [mixer for _, _, mixer in family.mixers(model, ATTENTION)]


def _first_dims(output: torch.Tensor, count: int, stride: int = 1) -> torch.Tensor:
    """``[B, T, heads * head_dim]`` projection output -> ``[B, count, T]``: dimension 0 of every
    ``stride``-th head (k: every KV head; q: each group's first query head)."""
    B, T, _ = output.shape
    per_head = output.view(B, T, count * stride, -1)[..., 0]
    return per_head[..., ::stride].transpose(1, 2)


# ---- the attention function --------------------------------------------------------------------------
def _valid_keys(attention_mask, like: torch.Tensor) -> torch.Tensor:
    """[B, T] True where a prefill's token is not padding (its key is visible to the last query)."""
    if attention_mask is None:
        return torch.ones(like.shape[0], like.shape[2], dtype=torch.bool, device=like.device)
    last = attention_mask[:, 0, -1, -like.shape[2]:]
    return last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2


def _float_mask(attention_mask, query: torch.Tensor, T: int) -> torch.Tensor:
    if attention_mask is None:
        causal = torch.full((T, T), float("-inf"), device=query.device).triu(1)
        return causal[None, None]
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, device=query.device).masked_fill(~attention_mask, float("-inf"))
    return attention_mask


def kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention: the training form (masks, running sums) over a whole sequence, or one
    decoding step against the compressed cache."""
    at: _Attached = module._hyprune_kv
    spec, scaling = at.spec, scaling if scaling is not None else query.shape[-1] ** -0.5
    T = query.shape[2]
    alpha = decisions(at.k0[..., -T:], spec, module.training, at.center, at.scale)
    at.stats["alpha"] = alpha  # the training objective's ratio term reads it (`hyprune.kv.train.kept_share`)
    omega = torch.sigmoid(at.q0[..., -T:].float()) if spec.method == "dmc" else None
    layer = at.layer
    if layer is not None and layer.state is not None:
        if T != 1:
            raise HypruneError("the compressed KV cache takes a prefill, then one token at a time")
        window = getattr(module.config, "sliding_window", None)
        if layer.is_sliding and window and layer.seen > window:
            raise HypruneError(f"layer {module.layer_idx} slides its attention over {window} tokens; the compressed "
                               "cache does not drop tokens by position yet, so it stops at the window")
        return _decode_step(at, query, key, value, alpha, omega, scaling)
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(spec.inner, None) if spec.inner != "eager" else None
    z, valid = None, _valid_keys(attention_mask, key)
    if spec.method == "dms":
        bias = dms_bias(alpha, spec.window)
    else:
        alpha = first_opens(alpha, valid)  # the dmc_bias and the cache's slots see the same decisions
        key, value, z = dmc_accumulate(key, value, alpha, omega)
        key, value = key.to(query.dtype), value.to(query.dtype)
        bias = dmc_bias(alpha)
    causal = _float_mask(attention_mask, query, T)
    if inner is None:
        out = attend(query, key, value, bias + causal, scaling).transpose(1, 2)
    else:
        mask = (causal + expand_heads(bias, at.groups)).to(query.dtype)
        out, _ = inner(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    if layer is not None:
        _prefill(at, key, value, alpha, z, valid)
    return out.contiguous(), None


def _prefill(at: _Attached, key, value, alpha, z, valid) -> None:
    B, H, _, D = key.shape
    valid = valid[:, None, :].expand(B, H, -1)
    if at.spec.method == "dms":
        at.layer.state = DMSState(B, H, D, at.spec.window, page=at.spec.page, dtype=key.dtype, device=key.device)
        at.layer.state.add(key, value, alpha, valid)
    else:
        at.layer.state = DMCState(B, H, D, page=at.spec.page, dtype=key.dtype, device=key.device)
        at.layer.state.prefill(key, value, z, alpha, valid)


def _decode_step(at: _Attached, query, key, value, alpha, omega, scaling):
    state = at.layer.state
    valid = torch.ones_like(alpha, dtype=torch.bool)
    if at.spec.method == "dms":
        state.add(key, value, alpha, valid)
    else:
        state.step(key, value, alpha, omega, valid)
    keys, values, bias = state.keys()
    out = attend(query, keys.to(query.dtype), values.to(query.dtype), bias, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, kv_attention)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


# ---- enabling it on a model ---------------------------------------------------------------------------
def attach(model, spec: KVSpec) -> None:
    """Record ``spec`` in the model's config and switch its attention to the compressed form (training and
    full-sequence forwards; `enable` adds the compressed cache for generation)."""
    current = model.config._attn_implementation
    spec.inner = spec.inner if current == NAME else (current or "eager")
    model.config.hyprune_kv = asdict(spec)
    mixers = attention_mixers(model)
    for field_name in ("centers", "scales"):
        values = getattr(spec, field_name)
        if values is not None and len(values) != len(mixers):
            raise HypruneError(f"config.hyprune_kv has {field_name} for {len(values)} attention layers; the model "
                               f"has {len(mixers)}")
    standardized = spec.centers is not None and spec.scales is not None
    for position, mixer in enumerate(mixers):
        at = _attach_module(mixer, spec, model.config)
        at.center = torch.tensor(spec.centers[position])[:, None] if standardized else None
        at.scale = torch.tensor(spec.scales[position])[:, None] if standardized else None
    model.set_attn_implementation(NAME)


def calibrate(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[list[list[float]], list[list[float]]]:
    """Per attention layer and KV head, the mean and standard deviation of k_0 over ``windows`` (the
    `KVSpec` ``centers`` and ``scales``); runs the model as it is."""
    mixers = attention_mixers(model)
    heads = _head_counts(model.config)[1]
    seen: list[list[torch.Tensor]] = [[] for _ in mixers]

    def record(position):
        def hook(_, __, output):
            seen[position].append(_first_dims(output.detach().float(), heads).transpose(1, 2).reshape(-1, heads))
        return hook

    handles = [m.k_proj.register_forward_hook(record(i)) for i, m in enumerate(mixers)]
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                model(windows[start : start + batch_size].to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    stats = [torch.cat(values) for values in seen]
    return ([s.mean(0).tolist() for s in stats],
            [s.std(0).clamp(min=1e-3).tolist() for s in stats])


def _head_counts(config) -> tuple[int, int]:
    heads = int(config.num_attention_heads)
    return heads, int(getattr(config, "num_key_value_heads", None) or heads)


def _attach_module(mixer, spec: KVSpec, config) -> _Attached:
    if getattr(mixer, "_hyprune_kv", None) is not None:
        mixer._hyprune_kv.spec = spec
        return mixer._hyprune_kv
    heads, kv_heads = _head_counts(config)
    at = _Attached(spec, kv_heads, heads // kv_heads)
    mixer._hyprune_kv = at

    def on_k(_, __, output):
        at.k0 = _first_dims(output, kv_heads)

    def on_q(_, __, output):
        at.q0 = _first_dims(output, kv_heads, at.groups)

    def on_forward(_, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        at.layer = cache.layers[mixer.layer_idx] if isinstance(cache, CompressedCache) else None

    mixer.k_proj.register_forward_hook(on_k)
    mixer.q_proj.register_forward_hook(on_q)
    mixer.register_forward_pre_hook(on_forward, with_kwargs=True)
    return at


def enable(model, spec: KVSpec | None = None):
    """Compressed inference on a loaded model: ``spec`` or the model's ``config.hyprune_kv``; afterwards
    ``model.generate`` builds a `CompressedCache` unless it is given a cache. Returns the model."""
    if spec is None:
        saved = getattr(model.config, "hyprune_kv", None)
        if not saved:
            raise HypruneError("this model has no config.hyprune_kv: it was not trained by `hyprune kv-compress`; "
                               "pass a KVSpec to try a method untrained")
        spec = KVSpec(**saved)
    attach(model, spec)
    if not getattr(model, "_hyprune_generate", None):
        plain = model.generate

        @wraps(plain)
        def generate(*args, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
                kwargs["cache"] = CompressedCache(model)
                kwargs["use_cache"] = True  # a config saved with use_cache=False would re-run every token
            return plain(*args, **kwargs)

        model._hyprune_generate = plain
        model.generate = generate
    return model


__all__ = ["CompressedCache", "CompressedLayer", "Compressing", "KVSpec", "attach", "calibrate", "compressed_layer", "decisions", "enable", "kv_attention"]
