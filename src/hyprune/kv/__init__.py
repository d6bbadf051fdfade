"""KV-cache compression the model learns: DMC (merging) and DMS (delayed eviction).

`hyprune.kv.enable(model)` switches a model trained by ``hyprune kv-compress`` (or any supported model,
with a `KVSpec`) to compressed inference; `hyprune.kv.methods` holds what each method does with a token's
(k, v) in training and in a cache, `hyprune.kv.store` the paged per-head storage, `hyprune.kv.train` the
ratio objective, `hyprune.kv.compress` the retrofit workflow.
"""

from hyprune.kv.model import CompressedCache, KVSpec, attach, enable

__all__ = ["CompressedCache", "KVSpec", "attach", "enable"]
