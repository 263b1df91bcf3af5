"""The device KV pool of an MLA model: one paged buffer per layer, written through the dispatcher.

An MLA layer caches one compressed row per token, ``[k_nope (kv_lora_rank) | k_rope
(qk_rope_head_dim)]``, instead of per-head K and V. :class:`MLATokenToKVPool` owns those rows for
every layer an engine (or a pipeline stage, via ``start_layer``/``end_layer``) runs, and gives the
attention kernels, the write path, transfer engines and HiCache the views they need.
"""

from __future__ import annotations

import operator
import os
from typing import Optional, Union

import torch

from mlakv import _env
from mlakv.spec import rules
from mlakv.ops import custom_ops as _ops  # registers the torch.ops.mlakv.* ops the pool uses under torch.compile
from mlakv.ops import route as _route
from mlakv.ops import v4 as _v4
from mlakv.ops.fp8 import check_pool_fp8
from mlakv.spec import formats as _formats

__all__ = ["MLATokenToKVPool", "FP8_DTYPES"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
LayerRef = Union[int, object]
RESERVED_SLOT = 0  # the dummy slot of padded tokens (sglang's reserved_skip_index): writes skip it


_CGROUP_ROOT = "/sys/fs/cgroup"  # where the cgroup file systems are mounted
_PROC_CGROUP = "/proc/self/cgroup"  # which cgroup this process is in


def _read_int(path: str) -> Optional[int]:
    """An integer file (a cgroup limit or counter); None if absent, unreadable or ``max``."""
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_headroom() -> Optional[int]:
    """Bytes this process's memory cgroup can still charge before its limit: ``memory.max -
    memory.current`` (v2) or ``memory.limit_in_bytes - memory.usage_in_bytes`` (v1), the smallest
    over the cgroup and its ancestors (a container sees its own as the root); None without a limit."""
    try:
        with open(_PROC_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best: Optional[int] = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, rel = parts
        if hid == "0" and controllers == "":
            base, limit_name, usage_name = _CGROUP_ROOT, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_name, usage_name = os.path.join(_CGROUP_ROOT, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        d = os.path.normpath(os.path.join(base, rel.lstrip("/")))
        while True:
            limit = _read_int(os.path.join(d, limit_name))
            if limit is not None:
                room = max(0, limit - (_read_int(os.path.join(d, usage_name)) or 0))
                best = room if best is None else min(best, room)
            if len(d) <= len(base) or not d.startswith(base):
                break
            d = os.path.dirname(d)
    return best


def _proc_kib(path: str, key: str) -> Optional[int]:
    """The ``key`` line of a ``/proc`` file (``"VmSize:   123 kB"``) in bytes; None if it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_headroom() -> Optional[int]:
    """Bytes of address space left under ``RLIMIT_AS`` (``ulimit -v``): the soft limit minus this
    process's ``VmSize``; None without a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    return max(0, soft - (_proc_kib("/proc/self/status", "VmSize:") or 0))


def host_available_bytes() -> Optional[int]:
    """Memory this process can still get: the least of the host's ``MemAvailable``, its memory
    cgroup's room (``memory.max``, v1 ``memory.limit_in_bytes``) and the address space left under
    ``RLIMIT_AS``; None if none can be read."""
    avail = _proc_kib("/proc/meminfo", "MemAvailable:")
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    limits = [v for v in (avail, _cgroup_headroom(), _address_space_headroom()) if v is not None]
    return min(limits) if limits else None


def _free_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` in bytes (CUDA: the driver's count; CPU: :func:`host_available_bytes`),
    or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return host_available_bytes()
    return None


class MLATokenToKVPool:
    """Per-layer paged KV buffers for MLA.

    Each layer owns ``kv_buffer[layer]`` of shape ``[num_slots, 1, kv_lora_rank +
    qk_rope_head_dim]``. Slot 0 (the first page) is reserved as the dummy target of padded
    tokens: writes skip it (as they skip ``loc < 0``), so usable slots are
    ``1 .. size + page_size - 1``. float8 pools store uint8 (``store_dtype``) and view back to
    ``dtype`` on read. ``qk_rope_head_dim`` may be 0 (rope-less rows).

    Index spaces: the write (:meth:`set_kv_buffer`) takes *logical* slots ``loc`` in
    ``[0, num_logical_slots)``; the gather (:meth:`get_mla_kv_buffer`), :meth:`get_key_buffer`,
    the buffer infos and HiCache address *physical* rows ``[0, num_slots)``. They are the same
    unless decode context parallelism is on: with ``dcp_world_size = W > 1`` this rank holds only
    the logical slots with ``loc % W == dcp_rank``, logical slot ``loc`` living in row ``loc // W``,
    and ``num_slots = ceil(num_logical_slots / W)`` rounded up to a whole page.

    Args:
        size: number of token slots to allocate (excluding the reserved page).
        page_size: tokens per page (1 for token granularity).
        dtype: the cache dtype (float16, bfloat16, float32, float8_e4m3fn, float8_e5m2).
        kv_lora_rank: ``nope_dim``, the latent width.
        qk_rope_head_dim: ``rope_dim``.
        layer_num: number of layers held here.
        device: where the buffers live.
        start_layer: global id of the first layer held (pipeline parallelism); default 0.
        end_layer: one past the last global id held; default ``start_layer + layer_num``.
        check_bounds: check slots on every write and gather and raise ``IndexError`` for one past
            the buffer (syncs; for debugging). None (default) follows ``MLAKV_CHECK_BOUNDS``;
            True/False override it. CPU pools always check.
        dcp_world_size: decode-context-parallel ranks sharing the logical slot space (1: off).
        dcp_rank: this pool's rank in ``[0, dcp_world_size)``.
        kv_cache_format: None (default: rows are exact copies of ``dtype``), ``"per_tensor"`` or
            ``"ds_mla"`` (with ``dtype=torch.float8_e4m3fn``; see :mod:`mlakv.ops.fp8`): bf16/fp16
            sources are quantized inside the write, :meth:`get_mla_kv_buffer` dequantizes in the gather.
            ``ds_mla`` rows are ``kv_lora_rank + 4 * kv_lora_rank / 128 + 2 * rope`` bytes (656 for
            512 + 64) and :meth:`get_key_buffer` returns them as uint8. The DeepSeek-V4 family's
            paged formats ``"v4"``, ``"v41"``, ``"v41_fp4"``, ``"v41_new"``, ``"v41_fp4_new"`` (with
            ``dtype`` bf16/fp16, ``kv_lora_rank=448``, ``qk_rope_head_dim=64``, ``page_size`` a power
            of two, 64 for FlashMLA; see :mod:`mlakv.ops.v4`): each layer is ``[num_pages, page_bytes]``
            uint8 (what :meth:`get_key_buffer` returns), :meth:`set_kv_buffer` quantizes ``[n, 512]``
            tokens in the write (optionally rotating their RoPE tail: ``freqs_cis`` or ``positions`` +
            ``cos_sin_cache``), :meth:`get_mla_kv_buffer` dequantizes to bf16; the buffer infos'
            item is a page. The whole-pool row operations (move, CPU copy) take row formats only.
        k_scale: per_tensor's scale: a positive float, or a 1-element fp32 tensor on ``device`` (kept
            by reference, so it may change between writes and CUDA-graph replays).
        ds_mla_scale_rule: how a ``ds_mla`` pool's writes choose each tile's fp32 scale, for the
            reader of the cache: ``"fp32_floor"`` (default: ``max(amax / 448, FLT_MIN)``, vLLM's rule
            before 0.33), ``"fp32"`` (sglang's DSA quantizer: ``amax / 448``, values times the
            reciprocal) or ``"ue8m0"`` (vLLM 0.33 and FlashMLA: a power of two); every path
            computes each bit-exactly (:mod:`mlakv.ops.fp8`, docs/formats.md). Other formats take
            only the default.

    Raises ``TypeError`` for an unsupported dtype or a size, width or layer id that is not an int
    (a bool or a float is refused, never truncated), and ``MemoryError`` (naming the sizes) when the
    buffers do not fit in the device's free memory — on the CPU the least of ``MemAvailable``, the
    memory cgroup's limit and ``RLIMIT_AS`` (:func:`host_available_bytes`) — before allocating anything.
    """

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        layer_num: int,
        device: Union[str, torch.device],
        start_layer: Optional[int] = None,
        end_layer: Optional[int] = None,
        *,
        check_bounds: Optional[bool] = None,
        dcp_world_size: int = 1,
        dcp_rank: int = 0,
        kv_cache_format: Optional[str] = None,
        k_scale: Union[float, torch.Tensor, None] = None,
        ds_mla_scale_rule: str = "fp32_floor",
    ) -> None:
        if not isinstance(dtype, torch.dtype) or dtype not in rules.SUPPORTED_DTYPES:
            raise TypeError(f"dtype {dtype} is not supported for a KV pool; expected one of {rules.SUPPORTED_DTYPES}")
        size, page_size, layer_num = (rules.check_int_arg(v, n) for v, n in
                                      ((size, "size"), (page_size, "page_size"), (layer_num, "layer_num")))  # fmt: skip
        kv_lora_rank = rules.check_int_arg(kv_lora_rank, "kv_lora_rank")
        qk_rope_head_dim = rules.check_int_arg(qk_rope_head_dim, "qk_rope_head_dim")
        if start_layer is not None:
            start_layer = rules.check_int_arg(start_layer, "start_layer", 0)
        if end_layer is not None:
            end_layer = rules.check_int_arg(end_layer, "end_layer")
        if size <= 0 or page_size <= 0 or layer_num <= 0:
            raise ValueError(f"size, page_size and layer_num must be positive, got {size}, {page_size}, {layer_num}")
        if kv_lora_rank <= 0 or qk_rope_head_dim < 0:
            raise ValueError(
                f"kv_lora_rank must be positive and qk_rope_head_dim non-negative, got {kv_lora_rank}, {qk_rope_head_dim}"
            )
        rules.check_dcp(dcp_world_size, dcp_rank)
        if check_bounds is not None and not isinstance(check_bounds, bool):
            raise TypeError(f"check_bounds must be a bool or None, got {type(check_bounds).__name__}")
        self.size = size
        self.page_size = page_size
        self.dtype = dtype
        self.store_dtype = torch.uint8 if dtype in FP8_DTYPES else dtype
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.kv_cache_dim = kv_lora_rank + qk_rope_head_dim
        self.layer_num = layer_num
        self.device = torch.device(device)
        self.kv_cache_format = kv_cache_format
        rules.check_ds_mla_scale_rule(ds_mla_scale_rule)
        if kv_cache_format != "ds_mla" and ds_mla_scale_rule != "fp32_floor":
            raise ValueError(
                f"ds_mla_scale_rule={ds_mla_scale_rule!r} applies to kv_cache_format='ds_mla' only, "
                f"not {kv_cache_format!r}"
            )
        self.ds_mla_scale_rule = ds_mla_scale_rule
        self._v4 = kv_cache_format in _v4.V4_LAYOUTS  # a DeepSeek-V4 family pool: block-split pages
        if self._v4:
            page_size = _check_v4_pool(kv_cache_format, dtype, kv_lora_rank, qk_rope_head_dim, page_size, k_scale)
            self.store_dtype = torch.uint8
            self.k_scale = None
        else:
            self.k_scale = check_pool_fp8(
                kv_cache_format, k_scale, dtype, kv_lora_rank, qk_rope_head_dim, dcp_world_size, self.device
            )
        self.format = _formats.resolve(kv_cache_format, dtype, kv_lora_rank, qk_rope_head_dim)
        # the stored row's elements (ds_mla: its bytes; a V4-family pool: a token's bytes)
        self.kv_cache_dim = self.format.token_bytes if self._v4 else self.format.row_elems
        self.start_layer = 0 if start_layer is None else start_layer
        self.end_layer = self.start_layer + layer_num if end_layer is None else end_layer
        if self.end_layer - self.start_layer != layer_num:
            raise ValueError(
                f"end_layer - start_layer = {self.end_layer} - {self.start_layer} must equal layer_num={layer_num}"
            )
        # resolved once: True/False override MLAKV_CHECK_BOUNDS both ways
        check_bounds = _env.CHECK_BOUNDS if check_bounds is None else check_bounds
        self.dcp_world_size = dcp_world_size
        self.dcp_rank = dcp_rank
        self.num_logical_slots = size + page_size
        rows = -(-self.num_logical_slots // dcp_world_size)
        self.num_slots = -(-rows // page_size) * page_size
        elem = torch.empty((), dtype=self.store_dtype).element_size()
        shape = (
            (self.num_slots // page_size, self.format.page_bytes(page_size))  # V4 family: whole pages
            if self._v4 else self.format.buffer_shape(self.num_slots, page_size)
        )  # fmt: skip
        need = layer_num * elem * (shape[0] * shape[-1])
        free = _free_bytes(self.device)
        if free is not None and need > free:
            raise MemoryError(
                f"MLATokenToKVPool needs {need / 2**30:.2f} GiB ({layer_num} layers x {self.num_slots} slots x "
                f"{need // (layer_num * self.num_slots)} bytes) but {self.device} has {free / 2**30:.2f} GiB free"
            )
        self.kv_buffer = [torch.zeros(shape, dtype=self.store_dtype, device=self.device) for _ in range(layer_num)]
        # The write and gather of this layout, bound once: set_kv_buffer and get_mla_kv_buffer call it.
        if self._v4:
            self._route = _v4.bind_v4(
                kv_cache_format, page_size, self.kv_buffer, check_bounds=check_bounds,
                reserved_skip_index=RESERVED_SLOT, dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
            )  # fmt: skip
        else:
            self._route = _route.bind(
                self.format, dtype, self.kv_buffer, check_bounds=check_bounds, reserved_skip_index=RESERVED_SLOT,
                dcp_world_size=dcp_world_size, dcp_rank=dcp_rank, k_scale=self.k_scale,
                ds_mla_scale_rule=ds_mla_scale_rule,
            )  # fmt: skip
        # Views in the pool dtype, made once (ds_mla: the uint8 rows): what get_key_buffer returns.
        self._dtype_views = self._route.views
        self._row_split = (kv_lora_rank, qk_rope_head_dim)

    @property
    def check_bounds(self) -> bool:
        """Whether writes and gathers check slots (and raise ``IndexError``); settable."""
        return self._route.check_bounds

    @check_bounds.setter
    def check_bounds(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"check_bounds must be a bool, got {type(value).__name__}")
        self._route.check_bounds = value

    # ---- layer lookup -------------------------------------------------------------------
    def local_layer(self, layer: LayerRef) -> int:
        """This pool's index of global layer ``layer`` (an int id, numpy integers included, or an object
        with ``.layer_id``); ``TypeError``/``IndexError`` naming it otherwise."""
        layer_id = layer if type(layer) is int else getattr(layer, "layer_id", layer)
        if type(layer_id) is not int:
            try:  # numpy and other integer types count as ints; a bool is not a layer id
                if isinstance(layer_id, bool):
                    raise TypeError
                layer_id = operator.index(layer_id)
            except TypeError:
                raise TypeError(
                    f"layer must be an int id or have an int .layer_id, got {type(layer_id).__name__}"
                ) from None
        if not self.start_layer <= layer_id < self.end_layer:
            raise IndexError(f"layer id {layer_id} is outside this pool's layers [{self.start_layer}, {self.end_layer})")
        return layer_id - self.start_layer

    # ---- reads --------------------------------------------------------------------------
    def get_key_buffer(self, layer_id: LayerRef) -> torch.Tensor:
        """The layer's whole buffer ``[num_slots, 1, kv_lora_rank + qk_rope_head_dim]`` as ``dtype`` (physical rows)."""
        return self._dtype_views[self.local_layer(layer_id)]

    def get_value_buffer(self, layer_id: LayerRef) -> torch.Tensor:
        """The latent part ``[num_slots, 1, kv_lora_rank]`` of the layer's buffer (a view)."""
        return self.get_key_buffer(layer_id)[..., : self.kv_lora_rank]

    def get_kv_buffer(self, layer_id: LayerRef) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def get_mla_kv_buffer(
        self, layer: LayerRef, loc: torch.Tensor, dst_dtype: Optional[torch.dtype] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather rows ``loc`` of a layer as ``(k_nope [n_loc, kv_lora_rank], k_rope [n_loc, rope_dim])``.

        ``loc``: ``[n_loc]`` int32/int64 *physical* rows (``[0, num_slots)``; the same as the
        write's slots unless DCP is on), any stride. One rule on every path: a padding slot
        (``< 0``) gives a zero row; a slot ``>= num_slots`` raises ``IndexError`` when bounds are
        checked (always on CPU; on GPU with ``check_bounds=True`` or ``MLAKV_CHECK_BOUNDS=1``,
        which syncs) and gives a zero row otherwise; nothing is ever read outside the buffer.
        The result is in the pool ``dtype``, or cast to ``dst_dtype`` when given. An fp8-format
        pool (``kv_cache_format``) dequantizes in the gather (fused) to ``dst_dtype``, default bf16.
        """
        return self._route.gather(self.local_layer(layer), loc, dst_dtype)

    # ---- writes -------------------------------------------------------------------------
    def set_kv_buffer(
        self,
        layer: LayerRef,
        loc: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: Optional[torch.Tensor] = None,
        *,
        freqs_cis: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        cos_sin_cache: Optional[torch.Tensor] = None,
    ) -> None:
        """Write one layer's rows at *logical* slots ``loc``, in either of two forms.

        Rows with ``loc < 0`` (padding) or ``loc == 0`` (the reserved slot) are skipped; with DCP so
        are other ranks' slots, and a kept row lands at physical row ``loc // dcp_world_size``.

        * split (mlakv): ``cache_k = k_nope [n_loc, (1,) kv_lora_rank]``,
          ``cache_v = k_rope [n_loc, (1,) qk_rope_head_dim]``;
        * full row (sglang): ``cache_k [n_loc, (1,) kv_lora_rank + qk_rope_head_dim]``; ``cache_v`` is
          ignored (sglang passes the latent part there, or None). The row is written as two strided
          views of ``cache_k`` through the same dispatcher: no copy.

        The forms are told apart by ``cache_k``'s last dim; anything else raises ``ValueError``
        naming both widths expected. Sources are in the pool ``dtype``, or, into a float16/bfloat16/
        float32 pool, in another of those three: converted inside the write as ``source.to(dtype)`` (as
        sglang casts), one launch and no temporary. fp8 pools take their own formats (see ``kv_cache_format``).
        The write is the pool's route (:func:`mlakv.ops.route.bind`, bound once for this layout): an
        eager, unchecked CUDA write of rows in the pool dtype goes straight to the JIT kernel, whose
        launcher checks every rule; every other call, and any the launcher refuses, takes the
        dispatcher's checked path, which names the broken rule.

        A V4-family pool (``kv_cache_format="v41"`` etc.) quantizes the ``[n, 512]`` tokens into its pages
        (:func:`mlakv.ops.v4.set_v4_kv_buffer`); ``freqs_cis [n, 64]`` fp32 ``(cos, sin)`` pairs, or
        ``positions [n]`` with ``cos_sin_cache [max_pos, 64]``, rotate their RoPE tail inside the write.

        Args:
            layer: global layer id (an int, numpy integers included; not a bool), or an object with
                ``.layer_id``.
            loc: ``[n_loc]`` int32/int64, any stride.
        """
        nope, rope = self._split_row_sources(cache_k, cache_v)
        if freqs_cis is None and positions is None and cos_sin_cache is None:
            self._route.write(self.local_layer(layer), loc, nope, rope)
        elif self._v4:
            self._route.write(
                self.local_layer(layer), loc, nope, rope, freqs_cis=freqs_cis, positions=positions, cos_sin_cache=cos_sin_cache
            )
        else:
            raise ValueError(
                "freqs_cis / positions rotate inside the write of a V4-family pool only; this pool's "
                f"kv_cache_format is {self.kv_cache_format!r} (use set_kv_buffer_rope)"
            )

    def _split_row_sources(
        self, cache_k: torch.Tensor, cache_v: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_nope, k_rope)`` views for :meth:`set_kv_buffer`: the split form as given, or the full row cut in two."""
        nope, rope = self._row_split
        if isinstance(cache_k, torch.Tensor) and cache_k.dim():
            width = cache_k.shape[-1]
            v_fits = isinstance(cache_v, torch.Tensor) and cache_v.dim() > 0 and cache_v.shape[-1] == rope
            if width == nope and v_fits:
                return cache_k, cache_v  # the split form
            if width == nope + rope and (rope == 0 or not v_fits):
                return torch.split_with_sizes(cache_k, self._row_split, -1)  # sglang's full row (two views, one call)
        for name, t in (("cache_k", cache_k), ("cache_v", cache_v)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        width = cache_k.shape[-1] if cache_k.dim() else -1
        got_v = "None" if cache_v is None else str(cache_v.shape[-1] if cache_v.dim() else -1)
        raise ValueError(
            f"cache_k: last dim {width} (cache_v: {got_v}) fits neither form: a full row needs cache_k's last dim = "
            f"kv_lora_rank + qk_rope_head_dim = {nope + rope}; the split form needs cache_k's = kv_lora_rank={nope} "
            f"and cache_v's = qk_rope_head_dim={rope}"
        )

    def set_kv_buffer_rope(
        self,
        layer: LayerRef,
        loc: torch.Tensor,
        k_nope: torch.Tensor,
        k_pe: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        is_neox_style: bool,
        q_nope: Optional[torch.Tensor] = None,
        q_pe: Optional[torch.Tensor] = None,
        q_out: Optional[torch.Tensor] = None,
        *,
        q_scale: Union[float, torch.Tensor, None] = None,
    ) -> Optional[torch.Tensor]:
        """A layer's whole cache step in one launch: RoPE on ``k_pe`` (and ``q_pe``), the row write at
        *logical* slots ``loc`` in the pool's format, and the absorbed query ``q_out = [q_nope | rotated q_pe]``.

        Shapes: ``k_nope [n, (1,) kv_lora_rank]`` and ``k_pe [n, (1,) qk_rope_head_dim]`` (before
        rotation; bf16/fp16, the pool's dtype for 16-bit pools), ``positions [n]``, ``cos_sin_cache
        [max_pos, qk_rope_head_dim]`` float32 (cos half, then sin half), ``q_nope [n, H, kv_lora_rank]``,
        ``q_pe [n, H, qk_rope_head_dim]``, ``q_out [n, H, kv_lora_rank + qk_rope_head_dim]`` of q's dtype or
        float8_e4m3fn (then ``q_scale``); ``q_out`` None with a query: allocated. Row selection as
        :meth:`set_kv_buffer` (padding, the reserved slot, DCP), bounds as the pool's ``check_bounds``.
        Pools of 16-bit rows (bf16/fp16) and the ``per_tensor``/``ds_mla`` formats take it; other
        formats raise ``ValueError``. See :func:`mlakv.ops.rope_write.set_mla_kv_buffer_rope` (the
        result is bit-identical to rotating with a RoPE kernel and then calling :meth:`set_kv_buffer`).

        Returns ``q_out``, or None without a query.
        """
        from mlakv.ops.rope_write import set_mla_kv_buffer_rope

        fmt = self.kv_cache_format
        if fmt not in (None, "per_tensor", "ds_mla") or (fmt is None and self.dtype not in (torch.bfloat16, torch.float16)):
            raise ValueError(
                f"set_kv_buffer_rope takes pools of bf16/fp16 rows or kv_cache_format 'per_tensor'/'ds_mla'; "
                f"this pool is {self.dtype} with kv_cache_format={fmt!r}"
            )
        return set_mla_kv_buffer_rope(
            self.kv_buffer[self.local_layer(layer)], loc, k_nope, k_pe, positions, cos_sin_cache, is_neox_style,
            q_nope=q_nope, q_pe=q_pe, q_out=q_out, kv_cache_format=fmt, k_scale=self.k_scale, q_scale=q_scale,
            reserved_skip_index=RESERVED_SLOT, dcp_world_size=self.dcp_world_size, dcp_rank=self.dcp_rank,
            check_bounds=self.check_bounds, ds_mla_scale_rule=self.ds_mla_scale_rule,
        )  # fmt: skip

    # ---- sglang's whole-pool row operations ---------------------------------------------
    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor, *, disjoint: bool = False) -> None:
        """Copy rows ``src_loc -> tgt_loc`` (``[n]`` int32/int64 each, physical rows) in every layer, from the pre-move state.

        What speculative decoding calls to keep accepted tokens. Overlapping sets read the old rows.
        CUDA: one Triton launch for all layers (staged through a scratch inside the kernel; with
        ``disjoint=True``, when no slot is both source and target, row-parallel); CPU: torch. A slot outside
        ``[0, num_slots)`` raises ``IndexError`` when checked (always on CPU, ``check_bounds`` on
        GPU) and is skipped otherwise; nothing outside the buffers is touched.
        """
        self._rows_only("move_kv_cache")
        check = self.check_bounds
        if torch.compiler.is_compiling():
            _ops.move_kv_cache_op(self.kv_buffer, tgt_loc, src_loc, check, disjoint)
            return
        from mlakv.ops.move import move_kv_cache

        move_kv_cache(self.kv_buffer, tgt_loc, src_loc, check_bounds=check, disjoint=disjoint)

    def get_cpu_copy(self, indices: torch.Tensor, chunk_size: int = 8192) -> list[list[torch.Tensor]]:
        """Copy rows ``indices`` (``[n]`` int, physical rows) of every layer to the CPU (request offload).

        Returns ``out[layer][chunk]``: ``[<= chunk_size, 1, kv_cache_dim]`` tensors in the storage
        dtype, ``indices`` taken ``chunk_size`` at a time (sglang's format; an int >= 1). Syncs the device.
        """
        self._rows_only("get_cpu_copy")
        chunk_size = rules.check_int_arg(chunk_size, "chunk_size", 1)
        idx = self._checked_slots(indices, "indices")
        out = []
        for buf in self.kv_buffer:
            out.append([buf[idx[i : i + chunk_size]].to("cpu") for i in range(0, idx.numel(), chunk_size)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def load_cpu_copy(self, kv_cache_cpu: list[list[torch.Tensor]], indices: torch.Tensor) -> None:
        """Write back what :meth:`get_cpu_copy` returned, at rows ``indices`` (same count and chunking)."""
        self._rows_only("load_cpu_copy")
        idx = self._checked_slots(indices, "indices")
        if len(kv_cache_cpu) != self.layer_num:
            raise ValueError(f"kv_cache_cpu has {len(kv_cache_cpu)} layers but this pool holds {self.layer_num}")
        for layer, (buf, chunks) in enumerate(zip(self.kv_buffer, kv_cache_cpu)):
            got = sum(c.shape[0] for c in chunks)
            if got != idx.numel():
                raise ValueError(f"kv_cache_cpu[{layer}] holds {got} rows but indices has {idx.numel()}")
            for c in chunks:
                if tuple(c.shape[1:]) != tuple(buf.shape[1:]) or c.dtype != buf.dtype:
                    raise ValueError(
                        f"kv_cache_cpu[{layer}]: chunks must be [rows, {', '.join(map(str, buf.shape[1:]))}] "
                        f"{buf.dtype}, got {tuple(c.shape)} {c.dtype}"
                    )
        for buf, chunks in zip(self.kv_buffer, kv_cache_cpu):
            start = 0
            for c in chunks:
                buf[idx[start : start + c.shape[0]]] = c.to(self.device, non_blocking=True)
                start += c.shape[0]

    def _rows_only(self, what: str) -> None:
        """Raise ``ValueError`` for a whole-pool row operation on a V4-family pool (its layers are pages)."""
        if self._v4:
            raise ValueError(f"{what} moves rows; a {self.kv_cache_format!r} pool holds block-split pages")

    def _checked_slots(self, indices: torch.Tensor, name: str) -> torch.Tensor:
        """``indices`` as int64 on the pool device, after the rule book's check that they are slots in
        ``[0, num_slots)`` (:func:`mlakv.spec.rules.check_token_slots`)."""
        return rules.check_token_slots(indices, name, self.num_slots, 1).to(self.device)

    set_mla_kv_buffer = set_kv_buffer  # the name some engines call the MLA write by

    # ---- sizes and raw buffers (transfer engines, HiCache) ------------------------------
    def get_kv_size_bytes(self) -> int:
        """Total bytes of all layers' buffers."""
        return sum(b.numel() * b.element_size() for b in self.kv_buffer)

    def get_contiguous_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """``(data_ptrs, data_lens, item_lens)`` per layer: base address, buffer bytes, row (slot) bytes
        (a V4-family pool: page bytes, the unit its pages move in)."""
        ptrs = [b.data_ptr() for b in self.kv_buffer]
        lens = [b.numel() * b.element_size() for b in self.kv_buffer]
        items = [b[0].numel() * b.element_size() for b in self.kv_buffer]
        return ptrs, lens, items

    def row_bytes(self) -> int:
        """Bytes of one token row of one layer (a V4-family pool: a token's bytes, page padding not included)."""
        return self.kv_cache_dim * self.kv_buffer[0].element_size()


def _check_v4_pool(kv_cache_format, dtype, kv_lora_rank, qk_rope_head_dim, page_size, k_scale) -> int:
    """A V4-family pool's settings: bf16/fp16 values, 448 + 64 wide tokens, a power-of-two page size
    (returned), no ``k_scale``. Raises ``TypeError``/``ValueError`` naming the setting."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"kv_cache_format={kv_cache_format!r} takes dtype bfloat16 or float16 (its tokens), got {dtype}")
    if (kv_lora_rank, qk_rope_head_dim) != (rules.V4_DIM - rules.V4_ROPE_DIM, rules.V4_ROPE_DIM):
        raise ValueError(
            f"kv_cache_format={kv_cache_format!r} stores 448 + 64 values per token; got kv_lora_rank={kv_lora_rank}, "
            f"qk_rope_head_dim={qk_rope_head_dim}"
        )
    if k_scale is not None:
        raise ValueError(f"k_scale is only used with kv_cache_format='per_tensor', not {kv_cache_format!r}")
    return rules.check_page_size(page_size)
