"""Models larger than memory: score, plan and prune block by block, from safetensors shards to shards.

* `hyprune.stream.shards`: read one tensor at a time from (sharded) safetensors, write shards as they come.
* `hyprune.stream.layout`: file names <-> model names (transformers' conversion mapping).
* `hyprune.stream.blocks`: the meta-device skeleton, one block's weights at a time, the block-major sweep.
* `hyprune.stream.score`: activation and depth scores block by block (equal to the in-memory ones).
* `hyprune.stream.apply`: a plan applied tensor by tensor, from the source shards to the output shards.
* `hyprune.stream.sparsify`: magnitude, Wanda and SparseGPT block by block, shards to shards.
* `hyprune.stream.choice`: whether to stream (``--stream``, or the weights do not fit in memory).
"""
