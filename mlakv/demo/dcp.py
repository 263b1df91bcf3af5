"""The demo model's cache on one decode-context-parallel rank (see :mod:`mlakv.distributed.dcp`)."""

from __future__ import annotations

import torch

from mlakv.distributed.dcp import DCPGroup, all_gather_merge
from mlakv.mem_cache import MLATokenToKVPool

from .model import PoolKVCache

__all__ = ["DCPPoolKVCache"]


class DCPPoolKVCache(PoolKVCache):
    """The model's cache on one DCP rank: writes take logical slots (the pool keeps this rank's
    rows), attention sees this rank's rows only, and partial results are merged across ranks.

    Logical slots run over ``[0, pool.num_logical_slots)``; an allocator hands those out,
    identically on every rank.
    """

    def __init__(self, pool: MLATokenToKVPool, group: DCPGroup) -> None:
        w, r = pool.dcp_world_size, pool.dcp_rank
        if (w, r) != (group.world_size, group.rank):
            raise ValueError(
                f"pool holds DCP rank {r} of {w} but the group is rank {group.rank} of {group.world_size}"
            )
        super().__init__(pool)
        self.group = group

    @property
    def logical_slots(self) -> int:
        """How many logical slots the ranks' pools back together (what the allocator hands out)."""
        return self.pool.num_logical_slots

    def shard(
        self, layer: int, slots: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows of ``slots [B, T]`` (logical): rows at physical ``slot // W`` where
        ``slot % W == rank``; the other entries read the dummy row 0 and are masked out of
        ``mask [B, Q, T]``. Shapes stay static (the graph-capturable form)."""
        w = self.group.world_size
        owned = torch.remainder(slots, w) == self.group.rank
        phys = torch.where(owned, torch.div(slots, w, rounding_mode="floor"), torch.zeros_like(slots))
        c_nope, c_pe = self.gather(layer, phys)
        return c_nope, c_pe, mask & owned[:, None, :]

    def merge(self, o_lat: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        return all_gather_merge(o_lat, lse, self.group)
