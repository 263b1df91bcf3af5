"""Decode context parallelism (DCP): process groups, the log-sum-exp merge, a pool holding one rank's
share of the logical slots, and local multi-rank runs.

With DCP over ``W`` ranks, the token at logical slot ``loc`` belongs to rank ``loc % W`` and lives
there in physical row ``loc // W`` (the pool's ``dcp_world_size``/``dcp_rank`` options; every rank
is handed the same logical ``loc`` and writes only its rows). Attention then runs on each rank over
the rows it holds; the partial outputs, each normalised over its own rows, are all-gathered and
combined by their log-sum-exps, which gives exactly the softmax over all rows (up to rounding).

This module is the glue an engine needs for that, kept out of the model so the model stays the
single-rank code: :func:`init_dcp_group` (NCCL on CUDA, gloo on CPU), :func:`merge_attn_partials`
(pure math), :func:`all_gather_merge` (the collective), :func:`make_dcp_pool`, and :func:`run_ranks` (spawn ``W`` local processes with a deadline; what the
tests and the CPU run of the DCP check use).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlakv.mem_cache import MLATokenToKVPool

__all__ = [
    "DCPGroup",
    "all_gather_merge",
    "dcp_backend",
    "init_dcp_group",
    "interleave_rank_rows",
    "make_dcp_pool",
    "merge_attn_partials",
    "run_ranks",
]


# ---- process groups ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DCPGroup:
    """This process's place among the DCP ranks. ``group`` is the process group the ranks merge
    over; ``None`` allows no communication (a single rank, or the rank-local parts alone)."""

    rank: int
    world_size: int
    group: Optional[dist.ProcessGroup] = None


def dcp_backend(device: torch.device | str) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


_NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def init_dcp_group(
    device: torch.device | str,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    init_method: Optional[str] = None,
    timeout_s: float = 120.0,
) -> DCPGroup:
    """Join (or create) the default process group and return the DCP group spanning it.

    Without ``rank``/``world_size``/``init_method`` the ``torchrun`` environment is used
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Collectives that wait longer than
    ``timeout_s`` fail instead of hanging.
    """
    if torch.device(device).type == "cuda":
        for var, off in _NO_MULTICAST.items():  # NVLink multicast stays off (it can take shared GPUs down)
            os.environ.setdefault(var, off)
    if not dist.is_initialized():
        dist.init_process_group(
            dcp_backend(device),
            init_method=init_method or "env://",
            rank=int(os.environ["RANK"]) if rank is None else rank,
            world_size=int(os.environ["WORLD_SIZE"]) if world_size is None else world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DCPGroup(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


# torch >= 2.13 names the flat all-gather all_gather_single (all_gather_into_tensor before it)
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ---- the merge ------------------------------------------------------------------------------
def merge_attn_partials(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> torch.Tensor:
    """Combine ``W`` partial attention results into the attention over all their rows.

    Args:
        o_parts: ``[W, *S, D]``, each part normalised over its own rows (0 where it had none).
        lse_parts: ``[W, *S]`` float32 log-sum-exp of each part's scores (``-inf``: no rows).
    Returns:
        ``[*S, D]`` float32: ``sum_w exp(lse_w - lse) * o_w`` with ``lse = logsumexp_w lse_w``.
        Where no part had a row the result is 0.
    """
    if o_parts.shape[:-1] != lse_parts.shape:
        raise ValueError(f"o_parts {tuple(o_parts.shape)} must be lse_parts {tuple(lse_parts.shape)} plus a last dim")
    lse = torch.logsumexp(lse_parts.float(), dim=0)  # [*S]
    lse = lse.masked_fill(torch.isinf(lse), 0.0)  # no rows anywhere: every weight below is exp(-inf) = 0
    scale = torch.exp(lse_parts.float() - lse[None])  # [W, *S]
    return (scale[..., None] * o_parts.float()).sum(dim=0)


def all_gather_merge(o_lat: torch.Tensor, lse: torch.Tensor, group: DCPGroup) -> torch.Tensor:
    """All-gather every rank's ``(o_lat [*S, D], lse [*S])`` and merge them (one collective: the
    two are packed into one float32 tensor ``[*S, D + 1]``). Returns ``[*S, D]`` in ``o_lat``'s
    dtype, identical on every rank. CUDA-graph capturable with NCCL."""
    if group.world_size == 1:
        return o_lat
    if group.group is None:
        raise ValueError(f"merging over {group.world_size} ranks needs a process group (DCPGroup.group is None)")
    packed = torch.cat([o_lat.float(), lse.float()[..., None]], dim=-1).contiguous()
    flat = packed.reshape(-1)
    gathered = torch.empty(group.world_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    _ALL_GATHER_SINGLE(gathered, flat, group=group.group)
    gathered = gathered.view(group.world_size, *packed.shape)
    return merge_attn_partials(gathered[..., :-1], gathered[..., -1]).to(o_lat.dtype)


# ---- the cache --------------------------------------------------------------------------------
def make_dcp_pool(
    logical_slots: int,
    dtype: torch.dtype,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    layer_num: int,
    device: torch.device | str,
    group: DCPGroup,
) -> MLATokenToKVPool:
    """A token-granular pool (``page_size = 1``) backing ``logical_slots`` logical slots (slot 0
    reserved, as always) on this rank: it holds ``ceil(logical_slots / W)`` physical rows."""
    return MLATokenToKVPool(
        logical_slots - 1, 1, dtype, kv_lora_rank, qk_rope_head_dim, layer_num, device,
        dcp_world_size=group.world_size, dcp_rank=group.rank,
    )


def interleave_rank_rows(rank_buffers: Sequence[torch.Tensor]) -> torch.Tensor:
    """The logical buffer the ranks' buffers make together: ``out[p * W + r] = rank_buffers[r][p]``.

    Args:
        rank_buffers: ``W`` tensors ``[num_phys, ...]`` of one layer (rank order).
    Returns:
        ``[W * num_phys, ...]``.
    """
    stacked = torch.stack(list(rank_buffers), dim=1)  # [num_phys, W, ...]
    return stacked.reshape(-1, *stacked.shape[2:])


# ---- local multi-process runs ---------------------------------------------------------------
def _rank_entry(
    rank: int, fn: Callable, world_size: int, device_type: str, store_dir: str, timeout_s: float, args: tuple
) -> None:
    torch.set_num_threads(1)  # W processes share the machine's cores
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = init_dcp_group(device, rank, world_size, f"file://{store_dir}/store", timeout_s=timeout_s)
    try:
        result = fn(group, device, *args)
        torch.save(result, Path(store_dir) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, device_type: str = "cpu", timeout_s: float = 120.0
) -> list[Any]:
    """Run ``fn(group, device, *args)`` in ``world_size`` fresh processes (one per rank; gloo on
    CPU, NCCL with one GPU each on CUDA) and return their results in rank order.

    ``fn`` must be importable by name (a module-level function) and its result picklable by
    ``torch.save``. A rank that raises fails the call with its traceback; a run past ``timeout_s``
    kills the ranks and raises ``TimeoutError`` (a collective waiting that long fails in the rank).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="mlakv-dcp-") as d:
        ctx = mp.start_processes(
            _rank_entry, args=(fn, world_size, device_type, d, timeout_s, args), nprocs=world_size, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} DCP ranks did not finish within {timeout_s:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(Path(d) / f"result{r}.pt", weights_only=False) for r in range(world_size)]
