"""Per-head variable-length rows in fixed-size pages: the storage of a compressed KV cache.

Every (sequence, KV head) pair -- a *lane* -- owns its own list of pages of `page` rows; a lane grows by
one row when its head appends and not at all when it merges into its last row (DMC) or drops a token
(DMS). Pages come from one pool per store, so the memory a cache holds is what its heads keep, rounded up
to a page per lane, not ``lanes x longest lane``. Attention reads the lanes back padded to the longest
one (`gather`), a transient of the step that computes it.
"""

from __future__ import annotations

import torch

from hyprune.errors import HypruneError


class PagedRows:
    """Rows of ``width`` values (one tensor each of K and V per row; ``extra`` scalars per row too, DMC's
    running weight) in pages of ``page`` rows, for ``lanes`` independent lanes."""

    def __init__(self, lanes: int, width: int, *, page: int = 16, dtype=torch.float32, device="cpu",
                 extra: int = 0) -> None:
        if page < 1:
            raise HypruneError(f"page must be >= 1, got {page}")
        self.lanes, self.width, self.page, self.extra = lanes, width, page, extra
        self.dtype, self.device = dtype, torch.device(device)
        self.lengths = torch.zeros(lanes, dtype=torch.long, device=self.device)
        self.table = torch.full((lanes, 0), -1, dtype=torch.long, device=self.device)  # lane, page slot -> page
        self.pool_k = torch.empty(0, page, width, dtype=dtype, device=self.device)
        self.pool_v = torch.empty_like(self.pool_k)
        self.pool_x = torch.empty(0, page, extra, dtype=torch.float32, device=self.device)
        self.used_pages = 0

    # ---- size --------------------------------------------------------------------------------------
    def bytes_used(self) -> int:
        """Bytes of the pages the lanes hold (what a page-exact allocator would hold)."""
        return self.used_pages * self.page * self._row_bytes()

    def bytes_allocated(self) -> int:
        """Bytes of the pool tensors as allocated (the pool grows to the pages needed: `bytes_used`)."""
        return sum(t.numel() * t.element_size() for t in (self.pool_k, self.pool_v, self.pool_x))

    def _row_bytes(self) -> int:
        return 2 * self.width * self.pool_k.element_size() + self.extra * 4

    # ---- writes ------------------------------------------------------------------------------------
    def extend(self, keep: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Append, to every lane, its rows of ``k`` / ``v`` ([lanes, n, width]) where ``keep`` ([lanes, n]
        bool) is True, in order."""
        counts = keep.sum(dim=1)
        start = self.lengths
        self._reserve(start, start + counts)
        lane, row = keep.nonzero(as_tuple=True)  # row-major: each lane's rows in order
        if lane.numel() == 0:
            return
        rank = keep.long().cumsum(dim=1)[lane, row] - 1
        pos = start[lane] + rank
        self._write(self.table[lane, pos // self.page], pos % self.page, k[lane, row], v[lane, row],
                    None if x is None else x[lane, row])
        self.lengths = start + counts

    def overwrite_last(self, lanes: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       x: torch.Tensor | None = None) -> None:
        """Replace the last row of each listed lane (every one must hold a row)."""
        if lanes.numel() == 0:
            return
        pos = self.lengths[lanes] - 1
        if (pos < 0).any():
            raise HypruneError("overwrite_last on an empty lane")
        self._write(self.table[lanes, pos // self.page], pos % self.page, k, v, x)

    def last(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, x) of every lane's last row; zeros for an empty lane (check `lengths`)."""
        if self.used_pages == 0:
            return (self.pool_k.new_zeros(self.lanes, self.width), self.pool_v.new_zeros(self.lanes, self.width),
                    self.pool_x.new_zeros(self.lanes, self.extra))
        pos = (self.lengths - 1).clamp(min=0)
        page = self.table[torch.arange(self.lanes, device=self.device), pos // self.page].clamp(min=0)
        offset = pos % self.page
        empty = (self.lengths == 0)[:, None]
        return tuple(pool[page, offset].masked_fill(empty, 0) for pool in (self.pool_k, self.pool_v, self.pool_x))

    def _write(self, page, offset, k, v, x) -> None:
        self.pool_k[page, offset] = k.to(self.dtype)
        self.pool_v[page, offset] = v.to(self.dtype)
        if self.extra:
            self.pool_x[page, offset] = x.float()

    def _reserve(self, start: torch.Tensor, stop: torch.Tensor) -> None:
        """Pages so that every lane can hold rows up to ``stop`` (it holds ``start`` now)."""
        have, need = -(-start // self.page), -(-stop // self.page)  # pages per lane, now and after
        fresh = need - have
        total = int(fresh.sum())
        if total == 0:
            return
        if self.used_pages + total > self.pool_k.shape[0]:
            self._grow(self.used_pages + total)
        if int(need.max()) > self.table.shape[1]:
            more = torch.full((self.lanes, int(need.max()) - self.table.shape[1]), -1, dtype=torch.long,
                              device=self.device)
            self.table = torch.cat([self.table, more], dim=1)
        lane = torch.repeat_interleave(torch.arange(self.lanes, device=self.device), fresh)
        first = torch.cumsum(fresh, 0) - fresh  # index of each lane's first new page among the new ones
        slot = have[lane] + torch.arange(total, device=self.device) - first[lane]
        self.table[lane, slot] = torch.arange(self.used_pages, self.used_pages + total, device=self.device)
        self.used_pages += total

    def _grow(self, pages: int) -> None:
        capacity = pages  # exact, like transformers' DynamicCache, which copies its tensors on every token

        def grown(pool):
            bigger = pool.new_zeros((capacity, *pool.shape[1:]))
            bigger[: pool.shape[0]] = pool
            return bigger

        self.pool_k, self.pool_v, self.pool_x = grown(self.pool_k), grown(self.pool_v), grown(self.pool_x)

    # ---- reads -------------------------------------------------------------------------------------
    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, valid): every lane padded to the longest, [lanes, longest, width] and a [lanes, longest]
        bool mask of the rows that exist."""
        longest = int(self.lengths.max()) if self.lanes else 0
        rows = torch.arange(longest, device=self.device)
        valid = rows[None, :] < self.lengths[:, None]
        page = self.table[:, (rows // self.page)] if longest else self.table[:, :0]
        page = torch.where(valid, page, torch.zeros_like(page))  # padding reads page 0; masked out after
        flat = (page * self.page + rows % self.page).view(-1)  # row index into the pools seen as [pages * page]

        def read(pool):
            return pool.view(-1, pool.shape[-1]).index_select(0, flat).view(self.lanes, longest, pool.shape[-1])

        return read(self.pool_k), read(self.pool_v), valid


__all__ = ["PagedRows"]
