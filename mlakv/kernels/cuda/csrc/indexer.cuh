// DSA indexer K cache kernels: the quantizing store and the page-table gather.
//
// The format and the arithmetic are specified (and implemented in plain torch) in
// mlakv/ops/indexer_reference.py. A layer's cache is index_pages [num_pages, 8448] bytes; page p
// holds slots 64p .. 64p+63: 64 keys of 128 e4m3 bytes, then 64 fp32 scales. Slot s: key at
// (s % 64) * 128, scale at 8192 + (s % 64) * 4 of page s / 64.
//
// Store: key i of the call (128 bf16/fp16 values) goes to slot loc[i * loc_stride], quantized as
// sglang's FusedStoreCacheIndexerKernel does, bit for bit:
//   amax = max |x| (fmaxf: NaN ignored, inf counts); scale = max(1e-4f, amax) / 448 (IEEE division;
//   ue8m0: rounded up to a power of two by the bits); inv = 1 / scale (IEEE, __frcp_rn);
//   byte = cvt.rn.satfinite.e4m3(fmaxf(fminf(x * inv, 448), -448))  -- a NaN product becomes +448.
// Sixteen lanes (a half-warp) take one key: lane l loads values 8l .. 8l+7 as one 16-byte vector,
// the amax is a 4-step __shfl_xor_sync butterfly inside the half-warp, and the lane stores its 8
// e4m3 bytes as one 8-byte store (lane 0 also the 4-byte scale). A warp takes 2 * kSteps keys:
// every key's loc and source are loaded first, then each is quantized and stored, so kSteps
// 16-byte loads per lane are in flight together (the store is bandwidth-bound at large n).
// Row selection (the one rule of every mlakv write): a key is skipped when loc < 0 (padding),
// loc == skip_index (-1: none), or, with decode context parallelism (dcp_world > 1),
// loc % dcp_world != dcp_rank; a kept key lands at slot loc / dcp_world, and one landing at or past
// num_slots = 64 * num_pages is skipped, so no input makes the kernel write outside index_pages.
// With DCP a key's source is loaded only once loc says it is kept (a rank reads only what it stores).
// With kUsePDL the kernel waits on the previous grid (griddepcontrol.wait) before reading its inputs
// and lets the next grid launch at entry (early_trigger) or right after the wait; warps with no key
// leave before waiting. Offsets are 64-bit.
//
// Gather: request b's tokens j < seq_lens[b] (negative counts as 0) live in page table[b, j / 64]
// at position j % 64; they go to rows sum(seq_lens[:b]) + j of k_out [total, 128] and s_out [total].
// Block (b, y) computes that prefix once, then copies chunks of 64 tokens (one page: a contiguous
// run of keys and one of scales) c = y, y + gridDim.y, ... with 16-byte vectors. A chunk whose page
// id is negative, >= num_pages, or past the table's width gives zero keys and zero scales; rows at
// or past total are not written.
//
// The host launchers sit at the end of this file; mlakv/kernels/cuda/indexer.py instantiates them.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstdint>

#include "row_args.cuh"

namespace mlakv {
namespace indexer {

constexpr int kHeadDim = 128;
constexpr int64_t kPageTokens = 64;
constexpr int64_t kScaleOffset = kPageTokens * kHeadDim;  // 8192
constexpr int64_t kPageBytes = kPageTokens * (kHeadDim + 4);  // 8448
constexpr float kE4M3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// The store's arguments, gathered once by the launcher (strides in bytes except loc_stride).
struct StoreArgs {
  uint8_t* pages;
  int64_t page_stride, num_slots;
  const uint8_t* src;
  int64_t src_stride;
  const void* loc;
  int64_t loc_stride, n, skip_index, dcp_world, dcp_rank;
  int32_t ue8m0, early_trigger;
};

// Two products -> two e4m3 bytes (lo in the low byte), clipped as sglang's pack_fp8: fminf first
// (a NaN becomes +448), then fmaxf; RNE.
__device__ __forceinline__ uint32_t e4m3x2_clipped(float lo, float hi) {
  lo = fmaxf(fminf(lo, kE4M3Max), -kE4M3Max);
  hi = fmaxf(fminf(hi, kE4M3Max), -kE4M3Max);
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// A positive fp32 rounded up to a power of two by its bits (inf stays inf).
__device__ __forceinline__ float ue8m0_round_up(float s) {
  const uint32_t b = __float_as_uint(s);
  uint32_t e = ((b >> 23) & 0xffu) + ((b & 0x7fffffu) != 0u);
  e = e < 255u ? e : 255u;
  return __uint_as_float(e << 23);
}

template <bool kBf16, typename LocT, int kSteps, bool kUsePDL>
__global__ void store_index_k_kernel(const __grid_constant__ StoreArgs a) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 15;  // lane in the key's half-warp
  const int half = (threadIdx.x >> 4) & 1;
  const int64_t first = (thread >> 5) * (2 * kSteps);  // the warp's first key
  if constexpr (kUsePDL) {
    if (a.early_trigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  if (first >= a.n) return;  // warp-uniform: the shuffles below see all 32 lanes
  const bool dcp = a.dcp_world > 1;
  if constexpr (kUsePDL) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!a.early_trigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  int64_t slot[kSteps];
  uint4 v[kSteps];
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const int64_t item = first + 2 * k + half;  // both halves of a step read neighbouring rows
    v[k] = make_uint4(0u, 0u, 0u, 0u);
    slot[k] = -1;
    if (item < a.n) {
      const int64_t raw = static_cast<int64_t>(static_cast<const LocT*>(a.loc)[item * a.loc_stride]);
      const uint4* src = reinterpret_cast<const uint4*>(a.src + item * a.src_stride) + lane;
      if (!dcp) {  // the source load does not wait on a test of loc
        v[k] = *src;
        slot[k] = (raw >= 0 && raw != a.skip_index && raw < a.num_slots) ? raw : -1;
      } else {
        const int64_t row = raw / a.dcp_world;
        const bool live = raw >= 0 && raw != a.skip_index && raw - row * a.dcp_world == a.dcp_rank && row < a.num_slots;
        if (live) {
          v[k] = *src;
          slot[k] = row;
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    float f[8];
    widen8<kBf16>(v[k], f);
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(f[j]));  // fmaxf drops NaN
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float scale = __fdiv_rn(fmaxf(m, kAmaxFloor), kE4M3Max);
    if (a.ue8m0) scale = ue8m0_round_up(scale);
    const float inv = __frcp_rn(scale);
    if (slot[k] >= 0) {
      const int64_t page = slot[k] >> 6, pos = slot[k] & 63;
      uint8_t* base = a.pages + page * a.page_stride;
      const uint32_t b0 = e4m3x2_clipped(__fmul_rn(f[0], inv), __fmul_rn(f[1], inv));
      const uint32_t b1 = e4m3x2_clipped(__fmul_rn(f[2], inv), __fmul_rn(f[3], inv));
      const uint32_t b2 = e4m3x2_clipped(__fmul_rn(f[4], inv), __fmul_rn(f[5], inv));
      const uint32_t b3 = e4m3x2_clipped(__fmul_rn(f[6], inv), __fmul_rn(f[7], inv));
      reinterpret_cast<uint2*>(base + pos * kHeadDim)[lane] = make_uint2(b0 | (b1 << 16), b2 | (b3 << 16));
      if (lane == 0) *reinterpret_cast<float*>(base + kScaleOffset + pos * 4) = scale;
    }
  }
}

// The gather's arguments (strides in elements except page_stride, in bytes).
struct GatherArgs {
  const uint8_t* pages;
  int64_t page_stride, num_pages;
  const void* table;
  int64_t table_stride0, table_stride1, table_width;
  const void* lens;
  int64_t lens_stride, batch, total;
  uint8_t* k_out;
  uint32_t* s_out;
};

template <typename LensT>
__device__ __forceinline__ int64_t len_at(const GatherArgs& a, int64_t i) {
  const int64_t v = static_cast<int64_t>(static_cast<const LensT*>(a.lens)[i * a.lens_stride]);
  return v > 0 ? v : 0;
}

template <typename TableT, typename LensT, bool kUsePDL>
__global__ void gather_index_k_kernel(const __grid_constant__ GatherArgs a) {
  __shared__ int64_t partial[32];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  if constexpr (kUsePDL) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  const int64_t seq_len = len_at<LensT>(a, b);
  if (static_cast<int64_t>(blockIdx.y) * kPageTokens >= seq_len) return;  // block-uniform
  // start = sum(seq_lens[:b]): strided partial sums, then a warp butterfly and one across warps.
  int64_t acc = 0;
  for (int64_t i = tid; i < b; i += blockDim.x) acc += len_at<LensT>(a, i);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if ((tid & 31) == 0) partial[tid >> 5] = acc;
  __syncthreads();
  int64_t start = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) start += partial[w];
  const int64_t chunks = (seq_len + kPageTokens - 1) / kPageTokens;
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t page =
        c < a.table_width ? static_cast<int64_t>(static_cast<const TableT*>(a.table)[b * a.table_stride0 + c * a.table_stride1])
                          : -1;
    const bool valid = page >= 0 && page < a.num_pages;
    const int64_t tokens = seq_len - c * kPageTokens < kPageTokens ? seq_len - c * kPageTokens : kPageTokens;
    const int64_t row0 = start + c * kPageTokens;
    const uint8_t* src = a.pages + (valid ? page : 0) * a.page_stride;
    for (int64_t i = tid; i < tokens * (kHeadDim / 16); i += blockDim.x) {
      const int64_t row = row0 + (i >> 3);
      if (row >= a.total) break;  // rows only grow with i
      const uint4 v = valid ? reinterpret_cast<const uint4*>(src)[i] : make_uint4(0u, 0u, 0u, 0u);
      reinterpret_cast<uint4*>(a.k_out + row * kHeadDim)[i & 7] = v;
    }
    for (int64_t i = tid; i < tokens; i += blockDim.x) {
      const int64_t row = row0 + i;
      if (row >= a.total) break;
      a.s_out[row] = valid ? reinterpret_cast<const uint32_t*>(src + kScaleOffset)[i] : 0u;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host launchers. Python (mlakv/ops/indexer.py) has validated the call against the rule book
// (mlakv/spec/rules.py); these re-check every fact the kernels' memory safety rests on and raise a
// Python exception, never fault. The store returns false, launching nothing, when the source rows
// are not 16-byte aligned (address or row stride): the caller falls back to Triton. A call with
// nothing to do returns true after the checks, launching nothing.
// ---------------------------------------------------------------------------------------------
inline bool same_device(const DLDevice& a, const DLDevice& b) {
  return a.device_type == b.device_type && a.device_id == b.device_id;
}
inline bool is_int_index(const tvm::ffi::TensorView& t) {
  return t.dtype().code == kDLInt && (t.dtype().bits == 32 || t.dtype().bits == 64) && t.dtype().lanes == 1;
}

inline void check_pages(const tvm::ffi::TensorView& pages) {
  TVM_FFI_CHECK(pages.ndim() == 2 && pages.size(1) == kPageBytes, ValueError)
      << "index_pages must be [num_pages, " << kPageBytes << "]";
  TVM_FFI_CHECK(pages.dtype().code == kDLUInt && pages.dtype().bits == 8 && pages.dtype().lanes == 1, TypeError)
      << "index_pages must be uint8";
  TVM_FFI_CHECK(pages.stride(1) == 1 && (pages.size(0) <= 1 || pages.stride(0) >= kPageBytes), ValueError)
      << "index_pages: pages must be contiguous and must not overlap";
  TVM_FFI_CHECK(pages.device().device_type == kDLCUDA, ValueError) << "index_pages must be a CUDA tensor";
  TVM_FFI_CHECK(rows_aligned(pages, pages.stride(0), 16), ValueError)
      << "index_pages: the base address and the page stride must be multiples of 16 bytes";
}

template <int kSteps, bool kBf16, bool kUsePDL, typename LocT>
void launch_store_typed(const StoreArgs& a, int num_warps, cudaStream_t stream) {
  const int64_t keys_per_cta = static_cast<int64_t>(num_warps) * 2 * kSteps;
  const int64_t blocks = (a.n + keys_per_cta - 1) / keys_per_cta;
  TVM_FFI_CHECK(blocks <= 0x7fffffff, ValueError) << "n=" << a.n << " needs too many blocks";
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg =
      launch_config(dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(32 * num_warps)), 0, stream, kUsePDL,
                    attr);
  TVM_FFI_CHECK_CUDA_ERROR(cudaLaunchKernelEx(&cfg, store_index_k_kernel<kBf16, LocT, kSteps, kUsePDL>, a));
}

template <bool kUsePDL, typename LocT>
void launch_store_steps(const StoreArgs& a, bool bf16, int steps, int num_warps, cudaStream_t stream) {
#define MLAKV_INDEXER_STORE(STEPS)                                                  \
  (bf16 ? launch_store_typed<STEPS, true, kUsePDL, LocT>(a, num_warps, stream) \
        : launch_store_typed<STEPS, false, kUsePDL, LocT>(a, num_warps, stream))
  if (steps == 1) MLAKV_INDEXER_STORE(1);
  else if (steps == 2) MLAKV_INDEXER_STORE(2);
  else MLAKV_INDEXER_STORE(4);
#undef MLAKV_INDEXER_STORE
}

// pages: [num_pages, 8448] uint8 (16-byte aligned pages); loc: [n] int32/int64, any stride;
// src: [n, (1,) 128] bf16/fp16 with a contiguous last dim; skip_index -1: none; dcp_world >= 1,
// 0 <= dcp_rank < dcp_world; ue8m0: the power-of-two scale rule; steps in {1, 2, 4} (keys per
// half-warp); num_warps in [1, 32]; early_trigger: the PDL trigger at entry (else after the wait).
template <bool kUsePDL>
bool launch_store_index_k(tvm::ffi::TensorView pages, tvm::ffi::TensorView loc, tvm::ffi::TensorView src,
                          int64_t skip_index, int64_t dcp_world, int64_t dcp_rank, bool ue8m0, int64_t steps,
                          int64_t num_warps, bool early_trigger) {
  check_pages(pages);
  TVM_FFI_CHECK(loc.ndim() == 1, ValueError) << "loc must be 1-D [n], got " << loc.ndim() << "-D";
  TVM_FFI_CHECK(is_int_index(loc), TypeError) << "loc must be int32 or int64";
  TVM_FFI_CHECK(src.ndim() == 2 || (src.ndim() == 3 && src.size(1) == 1), ValueError)
      << "index_k must be 2-D [n, 128] or 3-D [n, 1, 128]";
  TVM_FFI_CHECK(src.size(-1) == kHeadDim && src.stride(-1) == 1, ValueError)
      << "index_k: the last dim must hold 128 contiguous values, got " << src.size(-1);
  const DLDataType sd = src.dtype();
  const bool bf16 = sd.code == kDLBfloat && sd.bits == 16 && sd.lanes == 1;
  const bool f16 = sd.code == kDLFloat && sd.bits == 16 && sd.lanes == 1;
  TVM_FFI_CHECK(bf16 || f16, TypeError) << "index_k must be bfloat16 or float16";
  const int64_t n = loc.size(0);
  TVM_FFI_CHECK(src.size(0) == n, ValueError) << "index_k: dim 0 is " << src.size(0) << " but loc has n=" << n;
  TVM_FFI_CHECK(same_device(pages.device(), loc.device()) && same_device(pages.device(), src.device()), ValueError)
      << "index_pages, loc and index_k must be on one CUDA device";
  TVM_FFI_CHECK(dcp_world >= 1 && dcp_rank >= 0 && dcp_rank < dcp_world, ValueError)
      << "dcp_rank=" << dcp_rank << " must lie in [0, dcp_world_size=" << dcp_world << ")";
  TVM_FFI_CHECK(steps == 1 || steps == 2 || steps == 4, ValueError) << "steps must be 1, 2 or 4, got " << steps;
  TVM_FFI_CHECK(num_warps >= 1 && num_warps <= 32, ValueError) << "num_warps must be in [1, 32], got " << num_warps;
  if (n == 0) return true;
  const int64_t src_stride = src.stride(0) * 2;
  if (!rows_aligned(src, src_stride, 16)) return false;
  StoreArgs a;
  a.pages = tensor_address(pages);
  a.page_stride = pages.stride(0);
  a.num_slots = pages.size(0) * kPageTokens;
  a.src = tensor_address(src);
  a.src_stride = src_stride;
  a.loc = tensor_address(loc);
  a.loc_stride = loc.stride(0);
  a.n = n;
  a.skip_index = skip_index < 0 ? -1 : skip_index;
  a.dcp_world = dcp_world;
  a.dcp_rank = dcp_rank;
  a.ue8m0 = ue8m0 ? 1 : 0;
  a.early_trigger = early_trigger ? 1 : 0;
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, pages.device().device_id));
  if (loc.dtype().bits == 32) {
    launch_store_steps<kUsePDL, int32_t>(a, bf16, static_cast<int>(steps), static_cast<int>(num_warps), stream);
  } else {
    launch_store_steps<kUsePDL, int64_t>(a, bf16, static_cast<int>(steps), static_cast<int>(num_warps), stream);
  }
  return true;
}

template <bool kUsePDL, typename TableT, typename LensT>
void launch_gather_typed(const GatherArgs& a, int64_t blocks_y, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config(dim3(static_cast<unsigned>(a.batch), static_cast<unsigned>(blocks_y)),
                                               dim3(256), 0, stream, kUsePDL, attr);
  TVM_FFI_CHECK_CUDA_ERROR(cudaLaunchKernelEx(&cfg, gather_index_k_kernel<TableT, LensT, kUsePDL>, a));
}

// pages: as the store's; table: [batch, max_pages] int32/int64, any strides; lens: [batch]
// int32/int64, any stride; k_out: [total, 128] 8-bit, contiguous, 16-byte aligned; s_out: [total]
// 32-bit, contiguous; blocks_y in [1, 65535]: blocks per request (each walks every blocks_y-th page).
template <bool kUsePDL>
bool launch_gather_index_k(tvm::ffi::TensorView pages, tvm::ffi::TensorView table, tvm::ffi::TensorView lens,
                           tvm::ffi::TensorView k_out, tvm::ffi::TensorView s_out, int64_t blocks_y) {
  check_pages(pages);
  TVM_FFI_CHECK(table.ndim() == 2 && is_int_index(table), TypeError) << "page_table must be a 2-D int32/int64 tensor";
  TVM_FFI_CHECK(lens.ndim() == 1 && is_int_index(lens), TypeError) << "seq_lens must be a 1-D int32/int64 tensor";
  const int64_t batch = lens.size(0);
  TVM_FFI_CHECK(table.size(0) == batch, ValueError)
      << "page_table: dim 0 is " << table.size(0) << " but seq_lens has batch=" << batch;
  const int64_t total = k_out.size(0);
  TVM_FFI_CHECK(k_out.ndim() == 2 && k_out.size(1) == kHeadDim && k_out.dtype().bits == 8 && k_out.IsContiguous(),
                ValueError)
      << "k_out must be a contiguous [total, 128] 8-bit tensor";
  TVM_FFI_CHECK(s_out.ndim() == 1 && s_out.size(0) == total && s_out.dtype().bits == 32 && s_out.IsContiguous(),
                ValueError)
      << "s_out must be a contiguous [total] 32-bit tensor";
  const DLDevice dev = pages.device();
  TVM_FFI_CHECK(same_device(dev, table.device()) && same_device(dev, lens.device()) && same_device(dev, k_out.device()) &&
                    same_device(dev, s_out.device()),
                ValueError)
      << "index_pages, page_table, seq_lens and the outputs must be on one CUDA device";
  TVM_FFI_CHECK(blocks_y >= 1 && blocks_y <= 65535, ValueError) << "blocks_y must be in [1, 65535], got " << blocks_y;
  TVM_FFI_CHECK(batch <= 0x7fffffff, ValueError) << "batch=" << batch << " is too large";
  if (batch == 0 || total == 0) return true;
  if (!rows_aligned(k_out, 0, 16) || !rows_aligned(s_out, 0, 4)) return false;
  GatherArgs a;
  a.pages = tensor_address(pages);
  a.page_stride = pages.stride(0);
  a.num_pages = pages.size(0);
  a.table = tensor_address(table);
  a.table_stride0 = table.stride(0);
  a.table_stride1 = table.stride(1);
  a.table_width = table.size(1);
  a.lens = tensor_address(lens);
  a.lens_stride = lens.stride(0);
  a.batch = batch;
  a.total = total;
  a.k_out = tensor_address(k_out);
  a.s_out = reinterpret_cast<uint32_t*>(tensor_address(s_out));
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev.device_id));
  const bool t32 = table.dtype().bits == 32, l32 = lens.dtype().bits == 32;
  if (t32 && l32) launch_gather_typed<kUsePDL, int32_t, int32_t>(a, blocks_y, stream);
  else if (t32) launch_gather_typed<kUsePDL, int32_t, int64_t>(a, blocks_y, stream);
  else if (l32) launch_gather_typed<kUsePDL, int64_t, int32_t>(a, blocks_y, stream);
  else launch_gather_typed<kUsePDL, int64_t, int64_t>(a, blocks_y, stream);
  return true;
}

}  // namespace indexer
}  // namespace mlakv
