"""Models larger than memory: score, plan and prune block by block, from safetensors shards to shards.

* `hyprune.stream.shards`: read one tensor at a time from (sharded) safetensors, write shards as they come.
* `hyprune.stream.score`: the importance sweep block by block (one block's weights in memory at a time).
* `hyprune.stream.apply`: a plan applied tensor by tensor, from the source shards to the output shards.
"""
