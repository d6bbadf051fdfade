"""What differs between the transformers releases hyprune supports, in one place.

transformers 5.24 renamed the generation cache argument of every causal LM to ``cache`` (output
field ``cache``); earlier 5.x releases call it ``past_key_values`` (attention and hybrid models) or
``cache_params`` (pure Mamba models). Passing the old name to 5.24 is not an error: the top-level
forward forwards it in ``**kwargs`` down to every Mamba mixer, which warns (a ~800-character
``FutureWarning`` per call) and ignores it, so the cache is never updated. Asking the signature
instead of the version keeps this correct for releases in between and after.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from transformers import DynamicCache

CACHE_ARGUMENTS = ("cache", "past_key_values", "cache_params")  # newest name first
# What transformers' DynamicCache (5.17 to 5.24 at least) says when it holds no attention layer (attention-free NemotronH).
ONLY_LINEAR_LAYERS = "can only be called on Attention layers"


def cache_argument(model) -> str:
    """The name under which ``model.forward`` takes (and its output returns) the generation cache."""
    params = inspect.signature(model.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes none of {CACHE_ARGUMENTS}; it cannot decode with a cache.")


def output_cache(output, name: str):
    """The cache a forward with ``use_cache=True`` returned, under the same name it takes it."""
    return getattr(output, name)


def _own_cache(model, decoding: "CachedDecoding"):
    """A DynamicCache whose length is the number of tokens fed, even with no attention layer in it.

    transformers 5.x asks the cache for its length (positions, mask offsets) and raises for a cache
    of Mamba layers only (``ONLY_LINEAR_LAYERS``), so stock decoding of an attention-free NemotronH
    fails. The decode loop knows the length; the cache is told it.
    """
    cache = DynamicCache(config=model.config)
    seq_length, mask_sizes = cache.get_seq_length, cache.get_mask_sizes

    def get_seq_length(layer_idx: int = 0) -> int:
        try:
            return seq_length(layer_idx)
        except ValueError:
            return decoding.length

    def get_mask_sizes(query_length: int, layer_idx: int) -> tuple[int, int]:
        try:
            return mask_sizes(query_length, layer_idx)
        except ValueError:  # (kv_length, kv_offset), as an attention layer would report them
            return decoding.length + query_length, 0

    cache.get_seq_length, cache.get_mask_sizes = get_seq_length, get_mask_sizes
    return cache


# models whose default cache raised ONLY_LINEAR_LAYERS once: later prefills build `_own_cache` at
# once, so a timed prefill (hyprune bench) never includes a failed forward
_NEEDS_OWN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class CachedDecoding:
    """Prefill then greedy steps with the model's own cache, under whichever argument name it takes.

    ``position_ids`` are passed explicitly where the forward takes them, so positions never depend on
    asking the cache; a model whose default cache cannot say its length (an attention-free NemotronH,
    e.g. after depth pruning) gets `_own_cache` instead.
    """

    def __init__(self, model, cache_factory=None):
        params = inspect.signature(model.forward).parameters
        self.cache_factory = cache_factory  # () -> the cache to prefill into (default: the model's own)
        self.model = model
        self.cache_arg = cache_argument(model)
        self.takes_positions = "position_ids" in params
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = None
        self.length = 0

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` ([batch, context]); returns the last position's logits [batch, vocab]."""
        kwargs = dict(self.extra)
        if self.takes_positions:  # [batch, context]
            kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        out = None
        if self.cache_factory is None and self.model not in _NEEDS_OWN_CACHE:
            try:
                out = self.model(input_ids=ids, use_cache=True, **kwargs)
            except ValueError as e:
                if ONLY_LINEAR_LAYERS not in str(e):
                    raise
                _NEEDS_OWN_CACHE[self.model] = True
        if out is None:  # a cache given from outside, or ours for a model whose own cannot say its length
            kwargs[self.cache_arg] = self.cache_factory() if self.cache_factory else _own_cache(self.model, self)
            out = self.model(input_ids=ids, use_cache=True, **kwargs)
        self.length = ids.shape[1]
        self.cache = output_cache(out, self.cache_arg)
        return out.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` ([batch, 1]) at the next position; returns its logits [batch, vocab]."""
        kwargs = {self.cache_arg: self.cache}
        if self.takes_positions:
            kwargs["position_ids"] = torch.full_like(token, self.length)
        out = self.model(input_ids=token, use_cache=True, **kwargs, **self.extra)
        self.cache = output_cache(out, self.cache_arg)
        self.length += 1
        return out.logits[:, -1]


def probe_generate(model, max_new_tokens: int = 2) -> str | None:
    """Run stock ``generate()`` for a couple of tokens; None if it works, else the error (one line).

    A pruned model can be valid and still trip a transformers bug (attention-free NemotronH in 5.24);
    the prune summary records the result so the user learns it before deploying.
    """
    device = next(model.parameters()).device
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    except Exception as e:  # any failure is what we report; nothing is re-raised
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        model.train(was_training)
    return None
