// What the row kernels share (the plain write in row_write.cuh, the quantizing writes in fp8.cuh,
// rope_write.cuh and indexer.cuh, the V4-family store): the argument block they take as one
// __grid_constant__ struct, the launch configuration with programmatic dependent launch (PDL), the
// widening of a 16-byte vector of 16-bit values to fp32, and the launchers' view of a tensor's bytes.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>

#include <cstdint>
#include <cstring>

namespace mlakv {

// A row kernel's arguments, gathered once by the launcher (strides in bytes except loc_stride).
// A row i is written to slot loc[i * loc_stride] unless that is negative, equal to skip_index
// (-1: none) or past num_slots; with dcp_world > 1 only slots of this rank (loc % dcp_world ==
// dcp_rank, landing at loc / dcp_world) are written.
struct RowArgs {
  uint8_t* kv;
  int64_t kv_stride, num_slots;
  const uint8_t* nope;
  int64_t nope_stride;
  const uint8_t* rope;
  int64_t rope_stride;
  const void* loc;
  int64_t loc_stride, n_loc, skip_index, dcp_world, dcp_rank;
};

// A tensor's first byte: its data pointer plus its byte_offset (where a view starts).
inline uint8_t* tensor_address(const tvm::ffi::TensorView& t) {
  return static_cast<uint8_t*>(t.data_ptr()) + t.byte_offset();
}

// The bytes of one element of a tensor (sub-byte dtypes round up).
inline int64_t elem_bytes(const tvm::ffi::TensorView& t) {
  return static_cast<int64_t>((t.dtype().bits * t.dtype().lanes + 7) / 8);
}

// Whether a tensor's first byte and its row stride (bytes) are both multiples of `align` bytes: every
// row of it then starts on that alignment, as a kernel's vector loads and stores need.
inline bool rows_aligned(const tvm::ffi::TensorView& t, int64_t stride_bytes, int64_t align) {
  return ((reinterpret_cast<uintptr_t>(tensor_address(t)) | static_cast<uintptr_t>(stride_bytes)) % align) == 0;
}

// A launch configuration on `stream`, with programmatic stream serialization (PDL) when `pdl`;
// `attr` (one element) must outlive the launch call.
inline cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                                        cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// 8 source values (one 16-byte vector of bf16 or fp16) as fp32, exactly.
template <bool kBf16>
__device__ __forceinline__ void widen8(const uint4& v, float f[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (kBf16) {
      f[2 * j] = __uint_as_float(w[j] << 16);
      f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    } else {
      __half2 h;
      memcpy(&h, &w[j], 4);
      const float2 p = __half22float2(h);
      f[2 * j] = p.x;
      f[2 * j + 1] = p.y;
    }
  }
}

}  // namespace mlakv
