"""KV-cache compression the model learns: DMC (merging) and DMS (delayed eviction).

`hyprune.kv.methods` holds what each method does with a token's (k, v) in training and in a cache;
`hyprune.kv.store` the paged per-head storage of the cache.
"""
