"""PLACEHOLDER until the shards branch lands: a minimal reader over safe_open."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hyprune.errors import HypruneError


class ShardReader:
    def __init__(self, folder):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.map = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.map = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            raise HypruneError(f"{folder} has no safetensors weights.")

    def names(self):
        return list(self.map)

    def has(self, name):
        return name in self.map

    def read(self, name) -> torch.Tensor:
        with safe_open(self.map[name], "pt") as f:
            return f.get_tensor(name)

    def dtype(self, name):
        return self.read(name).dtype

    def total_bytes(self):
        return sum(p.stat().st_size for p in set(self.map.values()))
