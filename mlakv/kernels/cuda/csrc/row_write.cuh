// MLA KV-row write: kv_buffer[loc[i], :nope+rope] = [k_nope[i] | k_rope[i]]  (bit-exact byte copy).
//
// One warp takes kItemsPerWarp rows. Lanes load a row's nope and rope bytes with the widest vector
// the widths allow (16, else 8, else 4 bytes) and then either
//   * kUseTMA:  stage the row in the warp's 16-byte-aligned shared-memory slot, make it visible to
//              the async proxy (fence.proxy.async.shared::cta in every writing lane, then
//              __syncwarp), and lane 0 stores each whole row with one cp.async.bulk
//              (global <- shared::cta). Before exit, lane 0 commits and waits with
//              cp.async.bulk.wait_group 0 (not .read: that frees shared memory only and would not
//              wait for the global write);
//   * otherwise: store the registers straight to the destination row (a plain vectorised warp copy).
// rope may be 0 bytes wide (a rope-less row): its span then loads and stores nothing.
//
// Row selection (one rule, the same as the Triton and torch paths): loc is read at its own stride
// (loc[i * loc_stride], so strided, expanded and offset index vectors are honoured). A row is
// skipped when loc < 0 (padding), loc == skip_index (a reserved padding slot; -1 for none), or,
// with decode context parallelism (dcp_world > 1), loc % dcp_world != dcp_rank; a kept row lands
// at loc / dcp_world. A row landing at or past num_slots is skipped as well, so no input makes the
// kernel write outside kv_buffer (the Python side raises IndexError for it when bounds are checked).
// Addresses are formed in 64 bits.
// With kUsePDL the kernel waits on the previous grid (griddepcontrol.wait) before it reads inputs.
// It lets the next grid launch (griddepcontrol.launch_dependents) early: at entry
// (kEarlyTrigger) or right after the wait. The trigger carries no memory ordering — the dependent's
// own griddepcontrol.wait waits for this grid to complete and its stores to be visible — so its
// place only decides how much of the next launch overlaps this one. It must not sit behind a use
// of a loaded value: the compiler would then issue it only after that load returns (measured on
// the H100: +0.15-0.2 us per call). Which of the two places is faster depends on n_loc (the tuning
// table, mlakv/spec/tuning.py, says per size). Warps with no row leave before waiting.
//
// The host side (check_set_mla_kv_buffer, launch_set_mla_kv_buffer) sits at the end of this file;
// the Python loader instantiates it for one (nope bytes, rope bytes, PDL) triple per module.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstdint>

#include "row_args.cuh"

namespace mlakv {

// Largest of 16, 8, 4 that divides every argument (0 counts as divisible).
__host__ __device__ constexpr int vec_width(int a, int b = 0) {
  return (a % 16 == 0 && b % 16 == 0) ? 16 : (a % 8 == 0 && b % 8 == 0) ? 8 : 4;
}

template <int kBytes>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = uint32_t;
};

// The part of one row a lane holds in registers: chunk c = lane + 32*i of a kBytes-wide span.
template <int kBytes, int kVec>
struct LaneSpan {
  using V = typename VecOf<kVec>::type;
  static constexpr int kChunks = kBytes / kVec;
  static constexpr int kIters = kChunks == 0 ? 1 : (kChunks + 31) / 32;
  V v[kIters];

  __device__ __forceinline__ void load(const uint8_t* src, int lane) {
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = lane + 32 * i;
      if (c < kChunks) v[i] = reinterpret_cast<const V*>(src)[c];
    }
  }
  __device__ __forceinline__ void store(uint8_t* dst, int lane) const {
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = lane + 32 * i;
      if (c < kChunks) reinterpret_cast<V*>(dst)[c] = v[i];
    }
  }
};

__device__ __forceinline__ void bulk_store_row(void* gmem_dst, const void* smem_src, uint32_t bytes) {
  const uint32_t smem_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_src));
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem_dst), "r"(smem_addr),
               "r"(bytes)
               : "memory");
}

template <int kNopeBytes, int kRopeBytes, bool kUsePDL, bool kEarlyTrigger, bool kUseTMA, int kItemsPerWarp,
          typename LocT>
__global__ void set_mla_kv_buffer_kernel(uint8_t* __restrict__ kv, int64_t kv_stride,  // bytes
                                         int64_t num_slots,
                                         const uint8_t* nope, int64_t nope_stride,
                                         const uint8_t* rope, int64_t rope_stride,
                                         const LocT* loc, int64_t loc_stride,  // elements
                                         int64_t n_loc, int64_t skip_index, int64_t dcp_world,
                                         int64_t dcp_rank) {
  constexpr int kRowBytes = kNopeBytes + kRopeBytes;
  constexpr int kSlotBytes = (kRowBytes + 15) / 16 * 16;
  constexpr int kNopeVec = vec_width(kNopeBytes);
  constexpr int kRopeVec = vec_width(kRopeBytes, kNopeBytes);  // rope lands at byte kNopeBytes
  static_assert(kNopeBytes > 0 && kRopeBytes >= 0, "nope must be non-empty");
  static_assert(kNopeBytes % 4 == 0 && kRopeBytes % 4 == 0, "widths must be multiples of 4 bytes");
  static_assert(!kUseTMA || kRowBytes % 16 == 0, "a bulk copy moves a multiple of 16 bytes");

  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp) * kItemsPerWarp;

  if constexpr (kUsePDL && kEarlyTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (first >= n_loc) return;  // warp-uniform: no row for this warp, nothing to wait for
  if constexpr (kUsePDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if constexpr (kUsePDL && !kEarlyTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

  int64_t slot[kItemsPerWarp];
  LaneSpan<kNopeBytes, kNopeVec> n_regs[kItemsPerWarp];
  LaneSpan<kRopeBytes, kRopeVec> r_regs[kItemsPerWarp];
  // Without DCP the source loads do not depend on loc: issue them together with the loc load, so
  // a small call pays one memory round trip before its stores instead of two; only the stores test
  // loc. With DCP (dcp_world > 1, uniform) most rows belong to other ranks: load a row's sources
  // only once loc says it is kept, so a rank reads only the bytes it stores.
#pragma unroll
  for (int k = 0; k < kItemsPerWarp; ++k) {
    const int64_t item = first + k;
    slot[k] = -1;
    if (item < n_loc) {
      const int64_t raw = static_cast<int64_t>(loc[item * loc_stride]);
      if (dcp_world == 1) {
        // The branch is on a kernel argument, not on loc, and nothing before the loads reads raw:
        // the compiler issues them right behind the loc load (a condition on raw here put them a
        // whole memory round trip later: +0.3 us per call on the H100).
        n_regs[k].load(nope + item * nope_stride, lane);
        r_regs[k].load(rope + item * rope_stride, lane);
        slot[k] = (raw >= 0 && raw != skip_index && raw < num_slots) ? raw : -1;
      } else {
        const int64_t row = raw / dcp_world;
        const bool live = raw >= 0 && raw != skip_index && raw - row * dcp_world == dcp_rank && row < num_slots;
        slot[k] = live ? row : -1;
        if (live) {
          n_regs[k].load(nope + item * nope_stride, lane);
          r_regs[k].load(rope + item * rope_stride, lane);
        }
      }
    }
  }

  if constexpr (kUseTMA) {
    uint8_t* my_smem = smem + static_cast<int64_t>(warp) * kItemsPerWarp * kSlotBytes;
#pragma unroll
    for (int k = 0; k < kItemsPerWarp; ++k) {
      if (slot[k] >= 0) {
        n_regs[k].store(my_smem + k * kSlotBytes, lane);
        r_regs[k].store(my_smem + k * kSlotBytes + kNopeBytes, lane);
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncwarp();
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kItemsPerWarp; ++k) {
        if (slot[k] >= 0) bulk_store_row(kv + slot[k] * kv_stride, my_smem + k * kSlotBytes, kRowBytes);
      }
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
  } else {
#pragma unroll
    for (int k = 0; k < kItemsPerWarp; ++k) {
      if (slot[k] >= 0) {
        uint8_t* dst = kv + slot[k] * kv_stride;
        n_regs[k].store(dst, lane);
        r_regs[k].store(dst + kNopeBytes, lane);
      }
    }
  }
}

// The hot path's kernel: one warp per row, direct stores — the launch shape the tuning table picks
// on Hopper. Same rules as set_mla_kv_buffer_kernel (which serves the TMA and rows-per-warp
// variants of the benchmark's sweep), in the smallest body: in one CUDA graph of back-to-back PDL
// writes the general kernel's per-item arrays measured 0.15-0.3 us slower per call at 1-128 rows on
// the H100 (docs/benchmarks.md). The arguments come as one __grid_constant__ struct; DCP is a
// template parameter (kDcp), so the single-rank kernel carries no division or rank test.
template <int kNopeBytes, int kRopeBytes, bool kUsePDL, bool kEarlyTrigger, bool kDcp, typename LocT>
__global__ void set_mla_kv_row_kernel(const __grid_constant__ RowArgs a) {
  constexpr int kNopeVec = vec_width(kNopeBytes);
  constexpr int kRopeVec = vec_width(kRopeBytes, kNopeBytes);
  const int lane = threadIdx.x;  // blockDim = (32, warps)
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if constexpr (kUsePDL && kEarlyTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (item >= a.n_loc) return;
  const uint8_t* nope = a.nope + item * a.nope_stride;
  const uint8_t* rope = a.rope + item * a.rope_stride;
  const LocT* loc = static_cast<const LocT*>(a.loc) + item * a.loc_stride;
  if constexpr (kUsePDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if constexpr (kUsePDL && !kEarlyTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int64_t raw = static_cast<int64_t>(*loc);
  LaneSpan<kNopeBytes, kNopeVec> n_regs;
  LaneSpan<kRopeBytes, kRopeVec> r_regs;
  int64_t slot;
  if constexpr (!kDcp) {  // sources do not depend on loc: loaded right behind it
    n_regs.load(nope, lane);
    r_regs.load(rope, lane);
    slot = (raw >= 0 && raw != a.skip_index && raw < a.num_slots) ? raw : -1;
  } else {  // DCP: only the rows this rank keeps are read
    const int64_t row = raw / a.dcp_world;
    const bool live = raw >= 0 && raw != a.skip_index && raw - row * a.dcp_world == a.dcp_rank && row < a.num_slots;
    if (!live) return;
    slot = row;
    n_regs.load(nope, lane);
    r_regs.load(rope, lane);
  }
  if (slot < 0) return;
  uint8_t* dst = a.kv + slot * a.kv_stride;
  n_regs.store(dst, lane);
  r_regs.store(dst + kNopeBytes, lane);
}

// ---------------------------------------------------------------------------------------------
// Host launcher. It re-checks every fact the kernel's memory safety rests on and fails with a
// Python exception, never a fault.
// ---------------------------------------------------------------------------------------------

template <int kNopeBytes, int kRopeBytes, bool kUsePDL, bool kEarly, bool kUseTMA, int kItems, typename LocT>
void launch_variant(const RowArgs& a, int num_warps, cudaStream_t stream) {
  constexpr int kSlotBytes = (kNopeBytes + kRopeBytes + 15) / 16 * 16;
  const int64_t items_per_cta = static_cast<int64_t>(num_warps) * kItems;
  const int64_t blocks = (a.n_loc + items_per_cta - 1) / items_per_cta;
  TVM_FFI_CHECK(blocks <= 0x7fffffff, ValueError) << "n_loc=" << a.n_loc << " needs too many blocks";
  const size_t smem = kUseTMA ? static_cast<size_t>(items_per_cta) * kSlotBytes : 0;
  auto kernel = set_mla_kv_buffer_kernel<kNopeBytes, kRopeBytes, kUsePDL, kEarly, kUseTMA, kItems, LocT>;
  if (smem > 48 * 1024) {
    TVM_FFI_CHECK_CUDA_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg =
      launch_config(dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(num_warps * 32)), smem, stream,
                    kUsePDL, attr);
  TVM_FFI_CHECK_CUDA_ERROR(cudaLaunchKernelEx(&cfg, kernel, a.kv, a.kv_stride, a.num_slots, a.nope, a.nope_stride,
                                              a.rope, a.rope_stride, static_cast<const LocT*>(a.loc), a.loc_stride,
                                              a.n_loc, a.skip_index, a.dcp_world, a.dcp_rank));
}

template <int kNopeBytes, int kRopeBytes, bool kUsePDL, bool kEarly, typename LocT>
void launch_rows(const RowArgs& a, int num_warps, cudaStream_t stream) {
  const int64_t blocks = (a.n_loc + num_warps - 1) / num_warps;
  TVM_FFI_CHECK(blocks <= 0x7fffffff, ValueError) << "n_loc=" << a.n_loc << " needs too many blocks";
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg =
      launch_config(dim3(static_cast<unsigned>(blocks)), dim3(32, static_cast<unsigned>(num_warps)), 0, stream, kUsePDL,
                    attr);
  TVM_FFI_CHECK_CUDA_ERROR(
      a.dcp_world > 1 ? cudaLaunchKernelEx(&cfg, set_mla_kv_row_kernel<kNopeBytes, kRopeBytes, kUsePDL, kEarly, true, LocT>, a)
                      : cudaLaunchKernelEx(&cfg, set_mla_kv_row_kernel<kNopeBytes, kRopeBytes, kUsePDL, kEarly, false, LocT>, a));
}

template <int kNopeBytes, int kRopeBytes, bool kUsePDL, bool kEarly, typename LocT>
void launch_shape(const RowArgs& a, int num_warps, int items, bool use_tma, cudaStream_t stream) {
  if (!use_tma && items == 1) return launch_rows<kNopeBytes, kRopeBytes, kUsePDL, kEarly, LocT>(a, num_warps, stream);
#define MLAKV_LAUNCH(TMA, ITEMS) \
  launch_variant<kNopeBytes, kRopeBytes, kUsePDL, kEarly, TMA, ITEMS, LocT>(a, num_warps, stream)
  constexpr bool kTMAOk = (kNopeBytes + kRopeBytes) % 16 == 0;
  if (use_tma && kTMAOk) {
    if (items == 1) MLAKV_LAUNCH(kTMAOk, 1);
    else if (items == 2) MLAKV_LAUNCH(kTMAOk, 2);
    else MLAKV_LAUNCH(kTMAOk, 4);
  } else {
    if (items == 1) MLAKV_LAUNCH(false, 1);
    else if (items == 2) MLAKV_LAUNCH(false, 2);
    else MLAKV_LAUNCH(false, 4);
  }
#undef MLAKV_LAUNCH
}

template <int kNopeBytes, int kRopeBytes, bool kUsePDL, typename LocT>
void launch_loc(const RowArgs& a, int num_warps, int items, bool use_tma, bool early_trigger, cudaStream_t stream) {
  if (early_trigger) {
    launch_shape<kNopeBytes, kRopeBytes, kUsePDL, true, LocT>(a, num_warps, items, use_tma, stream);
  } else {
    launch_shape<kNopeBytes, kRopeBytes, kUsePDL, false, LocT>(a, num_warps, items, use_tma, stream);
  }
}

inline int64_t row_stride_bytes(const tvm::ffi::TensorView& t) { return t.stride(0) * elem_bytes(t); }

// The launcher's own copy of the rules (mlakv/spec/rules.py is the rule book; tests/test_rules.py
// asserts the two accept and refuse the same layouts). It does not trust its caller: every fact the
// kernel's memory safety rests on is checked here. Raises (TypeError/ValueError) for invalid
// arguments; returns false when they are valid but their addresses or row strides do not suit the
// kernel's vectors (kv rows on 16 bytes, nope/rope rows on their vector width): the caller falls
// back to another path. Does not require CUDA tensors (the parity test runs it on CPU tensors).
// kv: [num_slots, (1,) total]; loc: [n_loc] int32/int64, any stride; nope: [n_loc, (1,) nope];
// rope: [n_loc, (1,) rope] (rope may be 0 wide).
template <int kNopeBytes, int kRopeBytes>
bool check_set_mla_kv_buffer(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView nope,
                             tvm::ffi::TensorView rope, int64_t dcp_world, int64_t dcp_rank) {
  const auto rows_ok = [](const tvm::ffi::TensorView& t) {
    return t.ndim() == 2 || (t.ndim() == 3 && t.size(1) == 1);
  };
  TVM_FFI_CHECK(rows_ok(kv) && rows_ok(nope) && rows_ok(rope), ValueError)
      << "kv_buffer/cache_k_nope/cache_k_rope must be 2-D [n, d] or 3-D [n, 1, d]";
  const auto last_ok = [](const tvm::ffi::TensorView& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; };
  TVM_FFI_CHECK(last_ok(kv) && last_ok(nope) && last_ok(rope), ValueError)
      << "kv_buffer/cache_k_nope/cache_k_rope: the last dim must be contiguous";
  TVM_FFI_CHECK(loc.ndim() == 1, ValueError) << "loc must be 1-D [n_loc], got " << loc.ndim() << "-D";
  TVM_FFI_CHECK(loc.dtype().code == kDLInt && (loc.dtype().bits == 32 || loc.dtype().bits == 64) &&
                    loc.dtype().lanes == 1,
                TypeError)
      << "loc must be int32 or int64";
  const DLDataType dt = kv.dtype();
  const bool supported = dt.lanes == 1 && ((dt.code == kDLFloat && (dt.bits == 16 || dt.bits == 32)) ||
                                           (dt.code == kDLBfloat && dt.bits == 16) ||
                                           ((dt.code == kDLUInt || dt.code == kDLInt) && dt.bits == 8) ||
                                           dt.code == kDLFloat8_e4m3fn || dt.code == kDLFloat8_e5m2);
  TVM_FFI_CHECK(supported, TypeError) << "kv_buffer dtype is not supported (float16, bfloat16, float32, "
                                         "float8 e4m3fn/e5m2, uint8, int8)";
  TVM_FFI_CHECK(kv.dtype() == nope.dtype() && kv.dtype() == rope.dtype(), TypeError)
      << "kv_buffer, cache_k_nope and cache_k_rope must share one dtype";
  const DLDevice dev = kv.device();
  const auto on_dev = [&dev](const tvm::ffi::TensorView& t) {
    return t.device().device_type == dev.device_type && t.device().device_id == dev.device_id;
  };
  TVM_FFI_CHECK(on_dev(loc) && on_dev(nope) && on_dev(rope), ValueError)
      << "kv_buffer, loc, cache_k_nope and cache_k_rope must be on one device";
  const int64_t n_loc = loc.size(0);
  TVM_FFI_CHECK(nope.size(0) == n_loc && rope.size(0) == n_loc, ValueError)
      << "cache_k_nope/cache_k_rope: dim 0 must equal n_loc=" << n_loc;
  const int64_t elem = elem_bytes(kv);
  TVM_FFI_CHECK(nope.size(-1) * elem == kNopeBytes && rope.size(-1) * elem == kRopeBytes, ValueError)
      << "this module was built for " << kNopeBytes << " + " << kRopeBytes << " bytes, got "
      << nope.size(-1) * elem << " + " << rope.size(-1) * elem;
  TVM_FFI_CHECK(kv.size(-1) * elem >= kNopeBytes + kRopeBytes, ValueError)
      << "kv_buffer: last dim holds " << kv.size(-1) * elem << " bytes, the row needs " << kNopeBytes + kRopeBytes;
  TVM_FFI_CHECK(kv.size(0) <= 1 || kv.stride(0) >= kv.size(-1), ValueError)
      << "kv_buffer: rows overlap (dim 0 stride " << kv.stride(0) << " < last dim " << kv.size(-1) << ")";
  TVM_FFI_CHECK(dcp_world >= 1 && dcp_rank >= 0 && dcp_rank < dcp_world, ValueError)
      << "dcp_rank=" << dcp_rank << " must lie in [0, dcp_world_size=" << dcp_world << ")";
  constexpr int kNopeVec = vec_width(kNopeBytes), kRopeVec = vec_width(kRopeBytes, kNopeBytes);
  return rows_aligned(kv, row_stride_bytes(kv), 16) && rows_aligned(nope, row_stride_bytes(nope), kNopeVec) &&
         (kRopeBytes == 0 || rows_aligned(rope, row_stride_bytes(rope), kRopeVec));
}

// Checks (above), then launches on the current stream. num_warps in {1,2,4,8,16,32}; items in
// {1,2,4}; use_tma selects the bulk-store variant; early_trigger places the PDL trigger at entry
// (else right after the wait); skip_index: a loc value to skip (-1: none);
// dcp_world/dcp_rank: the decode-context-parallel owner rule (1/0: every row). Returns false,
// launching nothing, when the alignment does not suit the kernel.
template <int kNopeBytes, int kRopeBytes, bool kUsePDL>
bool launch_set_mla_kv_buffer(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView nope,
                              tvm::ffi::TensorView rope, int64_t num_warps, int64_t items, bool use_tma,
                              bool early_trigger, int64_t skip_index, int64_t dcp_world, int64_t dcp_rank) {
  const bool aligned = check_set_mla_kv_buffer<kNopeBytes, kRopeBytes>(kv, loc, nope, rope, dcp_world, dcp_rank);
  TVM_FFI_CHECK(kv.device().device_type == kDLCUDA, ValueError) << "kv_buffer must be a CUDA tensor";
  TVM_FFI_CHECK(num_warps >= 1 && num_warps <= 32 && (num_warps & (num_warps - 1)) == 0, ValueError)
      << "num_warps must be a power of two in [1, 32], got " << num_warps;
  TVM_FFI_CHECK(items == 1 || items == 2 || items == 4, ValueError) << "items per warp must be 1, 2 or 4";
  if (!aligned) return false;
  const int64_t n_loc = loc.size(0);
  if (n_loc == 0) return true;
  const RowArgs a{tensor_address(kv),        row_stride_bytes(kv), kv.size(0), tensor_address(nope), row_stride_bytes(nope),
                  tensor_address(rope),      row_stride_bytes(rope), tensor_address(loc), loc.stride(0), n_loc,
                  skip_index < 0 ? -1 : skip_index, dcp_world, dcp_rank};
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, kv.device().device_id));
  if (loc.dtype().bits == 32) {
    launch_loc<kNopeBytes, kRopeBytes, kUsePDL, int32_t>(a, static_cast<int>(num_warps), static_cast<int>(items),
                                                         use_tma, early_trigger, stream);
  } else {
    launch_loc<kNopeBytes, kRopeBytes, kUsePDL, int64_t>(a, static_cast<int>(num_warps), static_cast<int>(items),
                                                         use_tma, early_trigger, stream);
  }
  return true;
}

}  // namespace mlakv
